from adaptopt.cli import main

main()
