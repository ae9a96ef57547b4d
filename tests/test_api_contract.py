"""The public names, signatures and train.py flags of DESIGN.md, checked by the contract script beside the project."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT = os.path.join(ROOT, "..", "shared", "api_contract.py")


@pytest.mark.skipif(not os.path.exists(CONTRACT), reason="../shared/api_contract.py is not beside the project")
def test_api_contract_holds():
    result = subprocess.run([sys.executable, CONTRACT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "api contract: holds" in result.stdout, result.stdout + result.stderr
    assert "WRONG" not in result.stdout, result.stdout
