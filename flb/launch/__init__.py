"""The launcher: one simulation on a private SuperLink, checked before it starts (``python -m flb.launch``)."""
