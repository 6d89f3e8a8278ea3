"""Data: keypoint tables, readers, crops and the torch dataset."""
