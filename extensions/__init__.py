"""Curvature quantities computed by backward hooks (installed as ``curvlib.extensions``)."""

__all__ = []
