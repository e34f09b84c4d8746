"""pytest setup shared by the test files: Triton's CPU interpreter (TRITON_INTERPRET=1), patched once."""
import os

try:
    import triton
except ImportError:  # a CPU-only torch has no triton
    triton = None

if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter turns a scalar into int() of a 1-element array, which NumPy >= 2.4
    # refuses: every runtime-bound range() in a kernel fails. Patch that one conversion.
    from triton.runtime import interpreter as _interp

    _patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_with_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_with_index
