"""Offline: classify files, evaluate on labelled films, compare a shadow model with the live
one."""
