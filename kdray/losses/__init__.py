"""Loss functions, one file per paper: ``simcc`` (the task loss L_KL), ``tsd`` (TSD Eqs. 1-7:
feature MSE, L1 pose, skeleton structure loss, gamma(t), progressive GCN loss) and ``cdkd``.

Each loss takes named tensors and plain numbers; tasks compose them at the call site.
"""
