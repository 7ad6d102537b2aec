"""Generate tests/data/rope_golden.npz: RoPE and ALiBi values computed by Hugging Face transformers.

The test suite compares xattn.rotary_cos_sin / apply_rotary / alibi_slopes with these values;
transformers and torch are needed only to regenerate the file, never to run the tests.

Made with transformers 5.24.0 and torch 2.13.0+cpu (CPU), Python 3.11::

    python -m venv --system-site-packages /tmp/tfvenv    # torch already installed
    /tmp/tfvenv/bin/pip install transformers==5.24.0
    /tmp/tfvenv/bin/python tests/data/make_rope_golden.py

What is computed, per RoPE case (the keys are ``<case>/<name>``):

* ``inv_freq``: ``ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=...)`` (modeling_rope_utils;
  ``LlamaRotaryEmbedding.compute_default_rope_parameters`` for the default type).
* ``cos``, ``sin``: ``LlamaRotaryEmbedding(config)(x, position_ids)`` (``GPTNeoXRotaryEmbedding``
  for partial rotary: Llama ignores ``partial_rotary_factor``), the forward pass a model runs
  (including the dynamic-NTK update from the largest position id), shape ``(S, rotary_dim)``
  (the frequencies repeated twice, as HF lays them out).
* ``q``, ``q_rot``: a random ``(1, H, S, D)`` query and its rotation by the model's
  ``apply_rotary_pos_emb`` (Llama for full rotary, GPT-NeoX for partial rotary, which passes
  the channels past ``rotary_dim`` through). GPT-J's interleaved case uses GPT-J's own
  ``create_sinusoidal_positions`` and ``apply_rotary_pos_emb`` (``rotate_every_two``), on its
  ``(1, S, H, D)`` layout.
* ``positions``, and the case's parameters as JSON in ``<case>/params``.

ALiBi: ``alibi/<n>`` holds BLOOM's slopes for ``n`` heads, read from
``build_alibi_tensor(ones((1, 2)), n, float32)[:, 0, 1]`` (the bias at distance 1).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import transformers
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXRotaryEmbedding,
)
from transformers.models.gpt_neox.modeling_gpt_neox import (
    apply_rotary_pos_emb as neox_apply_rotary_pos_emb,
)
from transformers.models.gptj import modeling_gptj
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
)
from transformers.models.llama.modeling_llama import (
    apply_rotary_pos_emb as llama_apply_rotary_pos_emb,
)

OUT = pathlib.Path(__file__).with_name("rope_golden.npz")

# name: (head_dim, heads, rope parameters, max_position_embeddings, positions)
CASES = {
    "default": (64, 2, {"rope_type": "default", "rope_theta": 10000.0}, 2048, np.arange(37)),
    "default_far": (
        32, 1, {"rope_type": "default", "rope_theta": 10000.0}, 2048,
        np.array([0, 1, 5, 100, 1023, 2047, 4000]),
    ),
    "linear": (32, 2, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 2048,
               np.arange(25)),
    "dynamic_short": (  # longest position below max_position_embeddings: no rescaling
        32, 1, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 64,
        np.arange(40),
    ),
    "dynamic_long": (  # 150 positions > 64: NTK-aware base
        32, 1, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 64,
        np.arange(0, 150, 7),
    ),
    "llama3": (
        128, 1,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        131072, np.array([0, 1, 2, 17, 500, 8191, 9000, 20000]),
    ),
    "llama3_small_ctx": (  # a short original context puts many channels in the smooth band
        64, 1,
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 256, "rope_theta": 10000.0},
        1024, np.arange(0, 600, 31),
    ),
    "partial": (  # GPT-NeoX style: rotary_dim = 0.25 * 64 = 16
        64, 2, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        2048, np.arange(19),
    ),
    "partial_linear": (
        48, 1, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0,
                "partial_rotary_factor": 0.5},
        2048, np.arange(11),
    ),
}


def rope_case(rng, head_dim, heads, params, max_pos, positions):
    # Llama has no partial rotary; GPT-NeoX (rotary_pct) is the model family that has it.
    partial = "partial_rotary_factor" in params
    config_class, rotary_class = (
        (GPTNeoXConfig, GPTNeoXRotaryEmbedding) if partial else (LlamaConfig, LlamaRotaryEmbedding)
    )
    config = config_class(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        max_position_embeddings=max_pos,
        rope_parameters=dict(params),
    )
    assert getattr(config, "head_dim", None) in (None, head_dim)
    seq_len = int(positions.max()) + 1
    if params["rope_type"] == "default":  # transformers 5 keeps it on the model's rotary class
        inv_freq, attention_factor = rotary_class.compute_default_rope_parameters(config)
    else:
        init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
        inv_freq, attention_factor = init(config, None, seq_len)
    assert attention_factor == 1.0
    emb = rotary_class(config)
    q = torch.from_numpy(rng.standard_normal((1, heads, len(positions), head_dim)).astype("f4"))
    cos, sin = emb(q, torch.from_numpy(positions)[None])
    if partial:
        q_rot, _ = neox_apply_rotary_pos_emb(q, q, cos, sin)
    else:
        q_rot, _ = llama_apply_rotary_pos_emb(q, q, cos, sin)
    return {
        "inv_freq": inv_freq.numpy(),
        "cos": cos[0].numpy(),
        "sin": sin[0].numpy(),
        "q": q.numpy(),
        "q_rot": q_rot.numpy(),
        "positions": positions,
        "params": np.array(json.dumps({**params, "max_position_embeddings": max_pos,
                                       "head_dim": head_dim})),
    }


def gptj_case(rng, head_dim=32, rotary_dim=16, heads=2, seq=21):
    # GPT-J: sincos table (S, rotary_dim) = [sin | cos], channels paired (2i, 2i + 1).
    table = modeling_gptj.create_sinusoidal_positions(seq, rotary_dim)
    sin, cos = torch.split(table, rotary_dim // 2, dim=-1)
    q = torch.from_numpy(rng.standard_normal((1, seq, heads, head_dim)).astype("f4"))
    rot = modeling_gptj.apply_rotary_pos_emb(q[..., :rotary_dim], sin[None], cos[None])
    q_rot = torch.cat([rot, q[..., rotary_dim:]], dim=-1)
    return {
        "cos": cos.numpy(),
        "sin": sin.numpy(),
        "q": q.numpy(),
        "q_rot": q_rot.numpy(),
        "positions": np.arange(seq),
        "params": np.array(json.dumps({"rotary_dim": rotary_dim, "head_dim": head_dim,
                                       "rope_theta": 10000.0})),
    }


def main():
    rng = np.random.default_rng(20260601)
    arrays = {"versions": np.array(f"transformers {transformers.__version__}, "
                                   f"torch {torch.__version__}")}
    for name, case in CASES.items():
        for key, value in rope_case(rng, *case).items():
            arrays[f"{name}/{key}"] = value
    for key, value in gptj_case(rng).items():
        arrays[f"gptj/{key}"] = value
    for n in range(1, 34):
        alibi = build_alibi_tensor(torch.ones((1, 2), dtype=torch.long), n, torch.float32)
        arrays[f"alibi/{n}"] = alibi[:, 0, 1].numpy()
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with {arrays['versions']}")


if __name__ == "__main__":
    main()
