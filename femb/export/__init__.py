"""Export: ONNX with a parity check against PyTorch, and a Markdown model card."""

from femb.export.model_card import render_model_card, write_model_card
from femb.export.onnx import check_onnx_parity, check_zoo_interface, export_onnx, read_onnx_metadata

__all__ = [
    "check_onnx_parity",
    "check_zoo_interface",
    "export_onnx",
    "read_onnx_metadata",
    "render_model_card",
    "write_model_card",
]
