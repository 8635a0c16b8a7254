"""Profiling: each subgraph timed on real activations, an analytic cost model, the
machine's calibrated roofline and a bound class per subgraph (see docs/profiling.md)."""

from adaptopt.profile.pipeline import ProfileReport, SubgraphProfile, profile_model

__all__ = ["ProfileReport", "SubgraphProfile", "profile_model"]
