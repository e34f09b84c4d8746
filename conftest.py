"""pytest setup shared by the test files: Triton's CPU interpreter (TRITON_INTERPRET=1), patched once;
the command lines' --device auto kept on the CPU; each test in an empty working directory of its own."""
import functools
import os

import pytest

import data as datamod

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


@pytest.fixture(autouse=True, scope="session")
def command_lines_on_the_cpu():
    """In the tests the command lines' --device auto is the CPU, on any machine (a GPU test names
    cuda): their expected values (bit-equal resumes, tokens of a model built on the CPU) are the
    CPU's. Session-wide, so that fixtures of any scope and a test's monkeypatch.undo() keep it; the
    real function stays reachable as data.resolve_device.__wrapped__."""
    resolve_device = datamod.resolve_device

    @functools.wraps(resolve_device)
    def on_the_cpu(name):
        return "cpu" if name in (None, "auto") else resolve_device(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datamod, "resolve_device", on_the_cpu)
        yield


@pytest.fixture(autouse=True)
def working_directory_of_its_own(tmp_path_factory):
    """Each test runs in an empty folder of its own: the command lines' default outputs (runs/..., outputs/)
    never land in the clone, a user's own runs there change no test, and a clone the user cannot write in
    runs the tests too. Its own MonkeyPatch, as above."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield
