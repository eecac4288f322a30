"""CI: the installed wheel (not the source tree) evaluates the tiny arithmetic teacher and holds the SGLang schema.
Run by the wheel's own interpreter: python .ci/wheel_smoke.py EVAL_JSON"""
import json
import sys

import megatron_opd
from megatron_opd.wire.contract import CONTRACT

assert megatron_opd.__file__.startswith(sys.prefix), megatron_opd.__file__  # the wheel's copy, not the source tree
assert json.loads(CONTRACT.read_text())["paths"], f"{CONTRACT}: the packaged SGLang schema"
greedy = json.load(open(sys.argv[1]))["arithmetic"]["accuracy"]
assert greedy >= 0.5, f"the arithmetic teacher scored {greedy} from the wheel"
print(f"[ci] the wheel: {megatron_opd.__file__}, arithmetic teacher accuracy {greedy:.2f}")
