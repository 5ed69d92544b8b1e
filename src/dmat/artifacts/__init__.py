"""Where every artifact of the pipeline lives and how one stage reads what another wrote.

Stages talk to each other only through files: `layout` names them (paths, file names, formats),
`loaders` opens them (checkpoints into models, manifests, reports, adversarial examples), and
`onnx_classifier` runs an exported ONNX classifier as a callable. No stage imports another stage.
This package's `__init__` imports nothing, so the torch-free `layout` can be used on its own.
"""
