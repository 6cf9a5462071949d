"""Readouts: analyses that read what each continuous thought holds (logit lens, attention, probes).

Empty for now; readouts build on the family table and call schedule in `codi_nnsight.model`.
"""
