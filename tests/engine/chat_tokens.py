"""Counts a chat request's prompt tokens the way transformers' apply_chat_template and
vLLM do: the model folder's chat template rendered with jinja2 (sandboxed, trim_blocks,
lstrip_blocks, loop controls, transformers' tojson and raise_exception), then the Python
`tokenizers` package without special tokens. Usage: chat_tokens.py MODEL_DIR REQUEST_JSON;
prints the count."""

import json
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def token(cfg, key):
    v = cfg.get(key)
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def main():
    folder, request = sys.argv[1], json.loads(sys.argv[2])
    cfg = json.load(open(f"{folder}/tokenizer_config.json"))
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    messages = request["messages"]
    for m in messages:
        # vLLM, for a template that prints content as a string: text parts joined by
        # newlines; tool-call arguments as objects.
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    ctx = dict(request.get("chat_template_kwargs") or {})
    ctx.update(
        messages=messages,
        add_generation_prompt=request.get("add_generation_prompt", True),
        bos_token=token(cfg, "bos_token"),
        eos_token=token(cfg, "eos_token"),
    )
    if request.get("tools"):
        ctx["tools"] = request["tools"]
    text = env.from_string(cfg["chat_template"]).render(**ctx)
    ids = Tokenizer.from_file(f"{folder}/tokenizer.json").encode(text, add_special_tokens=False).ids
    print(len(ids))


main()
