"""Collects the config files of xpyd-proxy 1.2's repository: every YAML document written in
its tests that its own `ProxyConfig.from_yaml` accepts (the examples, the ```yaml blocks of
its docs that it accepts, and its --init-config template were copied the same way). Run with the 1.2
package's Python:

    target/compat-venvs/1.2.0/bin/python tests/python_compat/extract_configs.py \
        <checkout of xPyD-hub/xPyD-proxy at v1.2.0> tests/configs/python-1.2

The files it writes are data from that repository (Apache-2.0), kept with attribution.
"""

import ast
import pathlib
import sys
import tempfile
import textwrap

import yaml
from xpyd.config import ProxyConfig

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
seen = set()
TOP_KEYS = {"model", "prefill", "decode", "instances", "models", "port", "scheduling"}
kept = 0
for test in sorted(src.glob("tests/**/*.py")):
    tree = ast.parse(test.read_text())
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            # Configs written as Python dicts (then yaml.dump'ed by the test).
            try:
                value = ast.literal_eval(node)
            except (ValueError, SyntaxError, TypeError):
                continue
            if not (isinstance(value, dict) and TOP_KEYS & set(map(str, value))):
                continue
            text = yaml.safe_dump(value, sort_keys=False)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = textwrap.dedent(node.value)
        else:
            continue
        if ":" not in text or "\n" not in text.strip():
            continue
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if not isinstance(doc, dict) or text in seen:
            continue
        seen.add(text)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        try:
            ProxyConfig.from_yaml(f.name)
        except Exception:
            continue
        n += 1
        kept += 1
        rel = test.relative_to(src)
        name = f"{rel.stem}-{n}.yaml"
        header = (
            f"# From xPyD-hub/xPyD-proxy v1.2.0, {rel} (Apache-2.0);\n"
            "# a config its ProxyConfig.from_yaml accepts.\n"
        )
        (out / name).write_text(header + text)
print(f"{kept} configs")
