"""An onnxruntime session as a classifier callable: torch tensors in, torch logits out.

Lets the attack code (pyautoattack's gradient-free Square) and the deployment checks run against
the exported artifact itself. Imports torch only when called, never at import time.
"""

from __future__ import annotations

from pathlib import Path

from dmat.onnx_contract import INPUT_NAME, OUTPUT_NAME


class OnnxClassifier:
    """Calls an ONNX classifier (input `image`, output `logits`) through onnxruntime on the CPU."""

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = onnxruntime's default
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable models
            raise ValueError(f"{path}: onnxruntime cannot load the model ({err})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        if INPUT_NAME not in inputs:
            raise ValueError(f"{path}: no input named {INPUT_NAME!r} (inputs: {', '.join(inputs)})")

    def run(self, images):
        """numpy float32 NCHW in [0, 1] -> numpy logits."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    def __call__(self, x):
        import numpy as np
        import torch

        logits = self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(logits).to(x.device)
