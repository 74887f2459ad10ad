"""IR -> ONNX for Cloud AI 100: lowering rules, the custom-op function library, model assembly,
external data, float16, and running the result on onnxruntime."""

from qtrace.errors import register_library_package as _register_library_package

_register_library_package(__name__)

from .api import Lowered, lower, nonfinite_weights, warn_nonfinite_weights  # noqa: E402
from .custom_ops import CUSTOM_OP_DOMAINS, custom_op_function  # noqa: E402
from .rules import RULES  # noqa: E402
from .session import inference_session  # noqa: E402

__all__ = ["lower", "Lowered", "RULES", "CUSTOM_OP_DOMAINS", "custom_op_function", "inference_session", "nonfinite_weights",
           "warn_nonfinite_weights"]
