"""Generate the parameter-count table of ``docs/guide/parameter-counts.rst``.

Counts the trainable parameters of LoRA, PiSSA, DoTA, LoTR and LoRTA on LLaMA-2-7B,
LLaMA-3-8B and SmolLM2-135M from their configurations alone: the models are built on the
meta device (no weights, no memory). DoTA's, LoTR's and LoRTA's counts come from
:func:`tensornet.adapters.plan_dota`, :func:`~tensornet.adapters.plan_lotr` and
:func:`~tensornet.adapters.plan_lorta` (what ``get_peft_model`` with their configs would
train); LoRA's and PiSSA's from ``r * (in_features + out_features)`` per adapted matrix
(PiSSA has LoRA's shapes; only its initialization differs; ``tests/test_docs.py`` checks
the formula against peft's LoRA). LoRA, PiSSA, DoTA and LoTR adapt the DoTA paper's
targets, q_proj, k_proj, v_proj, up_proj and down_proj of every layer; LoRTA the attention
projections q_proj, k_proj, v_proj and o_proj.

Usage::

    .venv/bin/python docs/gen_param_table.py           # print the table
    .venv/bin/python docs/gen_param_table.py --write   # update docs/guide/parameter-counts.txt

``tests/test_docs.py`` checks that the committed table equals this script's output.
"""

from __future__ import annotations

import argparse
import pathlib
from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tensornet.adapters import plan_dota, plan_lorta, plan_lotr

TABLE = pathlib.Path(__file__).resolve().parent / "guide" / "parameter-counts.txt"

#: Published configurations (config.json of each checkpoint), the sizes that matter here.
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
MODELS: dict[str, dict] = {
    name: dict(zip(SIZES, values))
    for name, values in {
        "LLaMA-2-7B": (32000, 4096, 11008, 32, 32, 32, False),
        "LLaMA-3-8B": (128256, 4096, 14336, 32, 32, 8, False),
        "SmolLM2-135M": (49152, 576, 1536, 30, 9, 3, True),
    }.items()
}

#: (column title, method, rank); DoTA always with N = 5 cores. Two tables: the matrix
#: adapters on the paper's targets, then the cross-layer tensor adapters.
METHODS = (
    ("LoRA r=32", "lora", 32),
    ("PiSSA r=16", "lora", 16),
    ("DoTA N=5 R=16", "dota", 16),
    ("DoTA N=5 R=32", "dota", 32),
)
CROSS_LAYER = (
    ("LoTR r=16", "lotr", 16),
    ("LoTR r=64", "lotr", 64),
    ("LoRTA r=16", "lorta", 16),
    ("LoRTA r=64", "lorta", 64),
)


def count(name: str, methods: tuple = METHODS) -> tuple[int, list[int]]:
    """Base parameters of model ``name`` and the trainable parameters of each method."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**MODELS[name]))
    base = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    layers = plan_dota(model).layers  # the five targets of every layer, with their shapes
    planners = {"dota": partial(plan_dota, num_cores=5), "lotr": plan_lotr, "lorta": plan_lorta}
    out = []
    for _, method, rank in methods:
        if method == "lora":
            out.append(sum(rank * (lay.in_features + lay.out_features) for lay in layers))
        else:
            out.append(planners[method](model, rank=rank).trainable_params)
    return base, out


def _cell(n: int, base: int) -> str:
    return f"{n:,} ({100 * n / base:.3f}%)"


def table() -> str:
    """Both tables as reStructuredText grid tables, separated by a blank line."""
    return _grid(METHODS) + "\n" + _grid(CROSS_LAYER)


def _grid(methods: tuple) -> str:
    header = ["Model", "Base parameters", *(title for title, _, _ in methods)]
    rows = []
    for name in MODELS:
        base, counts = count(name, methods)
        rows.append([name, f"{base:,}", *(_cell(n, base) for n in counts)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(ch: str) -> str:
        return "+" + "+".join(ch * (w + 2) for w in widths) + "+"

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line("-"), row(header), line("=")]
    for r in rows:
        out += [row(r), line("-")]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {TABLE.name}")
    args = parser.parse_args()
    text = table()
    if args.write:
        TABLE.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
