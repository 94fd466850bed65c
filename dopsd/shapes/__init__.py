"""The `shapes` world (docs/replication.md): its renders, model, training scripts, metrics and committed weights."""

SCHEME = "shapes://"  # `shapes://NAME` names the committed `dopsd/shapes/weights/NAME.safetensors`
