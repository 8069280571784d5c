"""What the HTTP process's own code imports: no torch (the model runtime lives in the workers).

transformers 5 imports torch for any tokenizer, so the running server still holds
torch once its tokenizer is loaded; this guards what Tandem's own modules import.
"""

from __future__ import annotations

import subprocess
import sys

HTTP_MODULES = ["server.cli", "server.launcher", "server.app", "server.serving", "server.backend",
                "configs.loader", "configs.modes", "protocol.codec", "protocol.sockets"]


def test_the_http_side_imports_no_torch():
    code = f"import sys\nfor m in {HTTP_MODULES!r}: __import__(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
