"""``LORA_KERNELS_EXPECT_CUDA=1``, as CI with a CUDA toolkit sets it: a C++/CUDA extension that does not
import fails the run of ``tests/test_cuda_ext.py``; without the setting a missing extension is a skip.

A file of its own: ``tests/test_cuda_ext.py`` is skipped as a whole when the extension is not built, and
this test must run there too (it hides the extension in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_expecting_cuda_fails_when_the_extension_does_not_import(tmp_path):
    """``LORA_KERNELS_EXPECT_CUDA=1`` with an extension that does not import: the run fails, not "skipped"."""
    (tmp_path / "hide_lora_ext.py").write_text(
        textwrap.dedent(
            """
            import sys


            class HideExtension:
                '''A failed (optional) build leaves no lora_kernels._C: importing it raises ModuleNotFoundError.'''

                def find_spec(self, name, path=None, target=None):
                    if name == "lora_kernels._C":
                        raise ModuleNotFoundError("lora_kernels._C hidden by the test (a failed build)")
                    return None


            sys.meta_path.insert(0, HideExtension())
            """
        )
    )

    def run_cuda_ext_tests(expect: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
        env["LORA_KERNELS_EXPECT_CUDA"] = expect
        command = [sys.executable, "-m", "pytest", "-p", "hide_lora_ext", "-q", "-p", "no:cacheprovider"]
        # plus one passing test, as in a whole-suite CI run (a lone skipped module exits 5, "no tests ran")
        command += ["tests/test_cuda_ext.py", "tests/test_dispatch.py::test_torch_is_always_available"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    expected = run_cuda_ext_tests("1")
    assert expected.returncode != 0, expected.stdout + expected.stderr
    assert "LORA_KERNELS_EXPECT_CUDA" in expected.stdout + expected.stderr
    relaxed = run_cuda_ext_tests("0")  # without the expectation a missing extension is still a skip
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "1 passed, 1 skipped" in relaxed.stdout
