"""Network modules: backbones, the SimCC head, the pose model, TSD's IGP-GCN (``igp_gcn``) and
CDKD's projector ensemble with the scale-adaptive unit (``sape``).
"""
