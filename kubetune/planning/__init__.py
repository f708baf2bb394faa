"""Pure decisions: model architecture -> VRAM estimate -> GPU class, count and knobs -> placement."""
