"""Write a random tiny hybrid NemotronH checkpoint (Mamba-2, attention, MoE, MLP) with SmolLM2's
tokenizer, to elastify on real text in minutes on a CPU:

    python examples/tiny_nemotron_h.py /tmp/nemo-parent
    star-elastic elastify /tmp/nemo-parent --data wiki --tokens 4096 --seq-len 128 --batch-size 8 \
        --calib-batches 2 --eval-tokens 1024 --out /tmp/nemo-elastic
"""

import argparse

import torch

from star_elastic import save_pretrained
from star_elastic.assets import smollm2_gguf
from star_elastic.hf import load_tokenizer
from star_elastic.model import LAYER_CHARS, Model, ModelConfig


def main(out: str, layers: str = "M*EM-E", seed: int = 0):
    tokenizer = load_tokenizer(smollm2_gguf())
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, layer_types=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
                      ssm_state_size=16, n_groups=2, chunk_size=32, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Model(cfg)
    with torch.no_grad():  # a zero router scores every expert alike: start from distinct routing
        for kind, layer in zip(cfg.layer_types, model.model.layers):
            if kind == "E":
                layer.mixer.gate.weight.normal_(std=0.5)
    save_pretrained(model, out, tokenizer=tokenizer)
    print(f"wrote {out}: {model.num_parameters():,} parameters, layers {cfg.layer_types}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="/tmp/nemo-parent", help="the folder to write (default /tmp/nemo-parent)")
    ap.add_argument("--layers", default="M*EM-E", help="one character a layer: M Mamba-2, * attention, E MoE, - MLP")
    ap.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    args = ap.parse_args()
    if not args.layers or set(args.layers) - set(LAYER_CHARS):
        ap.error(f"--layers {args.layers!r}: one character a layer, each of {' '.join(LAYER_CHARS)}")
    main(args.out, args.layers, args.seed)
