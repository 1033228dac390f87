"""Offline fine-tuning support: procedural training data, dataset readers, losses and evaluation metrics.

Not used by the serving path. Array conventions follow `models.outputs`: depth is float32 `[H, W]` (here
metric, in metres, 0 = invalid), normals are float32 `[H, W, 3]` camera-frame unit vectors in the served
convention, +x towards the image's LEFT, +y up, +z towards the camera (`models.outputs.NORMALS_CONVENTION`: the
released Lotus / E2E-FT checkpoints' axes; OpenGL / Hypersim data is converted at load time, and Marigold
answers, which are in OpenGL's axes, before they are scored), images are float32
`[H, W, 3]` in [0, 1] when read and `[3, H, W]` in [-1, 1] in samples.
"""
