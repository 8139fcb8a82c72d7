"""The adapt section: memory and speed of adapting a pretrained base, four ways.

A Llama base of random weights (about 200 M parameters in full mode, grouped-query attention, untied
embeddings) is adapted by the train stage exactly as DVC runs it, on 2 ranks: full fine-tuning or LoRA,
under DDP or FSDP. Each run's log reports every rank's peak memory while training (the last step's
peak_memory_mib: the resident set on a CPU, which includes Python, torch and transformers themselves;
allocated memory on a GPU) and the steady tokens/s. Each figure sets one method or strategy against
full + DDP, the same model, data, batch and ranks; the four set-ups run REPEATS times, interleaved round by round.
"""

from __future__ import annotations

import math
import time

from benchmarks.harness import REPEATS, Bench, Run, figure, interleaved, side, span
from benchmarks.train import ensure_shards, run_train_stage, stage_throughput
from lmforge.params_file import write_overrides
from lmforge.runs.contracts import read_train_log

SETUPS = {  # (train.method, train.strategy)
    "full_ddp": ("full", "ddp"),
    "lora_ddp": ("lora", "ddp"),
    "full_fsdp": ("full", "fsdp"),
    "lora_fsdp": ("lora", "fsdp"),
}
# quick: the same code paths on a tiny model; full: ~200 M parameters and one sequence a rank, where
# weights, gradients and AdamW's moments (16 bytes a parameter) outweigh the libraries' own memory
# (~0.4 GB a rank) and the activations, which no method here changes
LLAMA = {
    True: {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2},
    False: {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 4},
}  # fmt: skip
RUN = {True: ["model.block_size=64", "train.batch_size=4", "train.max_steps=10"],
       False: ["model.block_size=256", "train.batch_size=1", "train.max_steps=8"]}  # fmt: skip


def run(b: Bench) -> dict:
    ensure_shards(b)
    base = llama_base(b)
    params_file = b.ws.root / "params.yaml"
    kept = params_file.read_text()
    steps = RUN[b.quick]

    def measure(name: str):
        method, strategy = SETUPS[name]

        def one() -> tuple[Run, Run]:  # (peak MiB, tokens) over the steady steps' seconds
            b.log(f"adapt: {method} + {strategy}, 2 ranks")
            write_overrides(b.ws.root, [
                f"model.base={base}", f"train.method={method}", f"train.strategy={strategy}", *steps,
                "train.nproc_per_node=2", "train.nnodes=1", "train.warmup_steps=2", "train.eval_every=1000",
                "train.eval_batches=1", "train.checkpoint_every=1000", "train.activation_checkpointing=false",
            ])  # fmt: skip
            started = time.time()
            run_train_stage(b)
            ended = time.time()
            tokens, seconds = stage_throughput(b.ws, b.params)
            peak = max(read_train_log(b.ws.train_log)[-1]["peak_memory_mib"])
            return span(peak, seconds, started, ended), span(tokens, seconds, started, ended)

        return one

    try:
        results = dict(zip(SETUPS, interleaved(REPEATS, *(measure(name) for name in SETUPS)), strict=True))
    finally:
        params_file.write_text(kept)  # the sections after this one train the workspace's own model

    def memory(name: str) -> dict:
        method, strategy = SETUPS[name]
        return side(f"{method} + {strategy}: peak memory of the busiest rank", "MiB",
                    [m for m, _ in results[name]], per=1.0)  # fmt: skip

    def speed(name: str) -> dict:
        method, strategy = SETUPS[name]
        return side(f"{method} + {strategy}", "tokens", [t for _, t in results[name]])

    params = saved_parameters(base)
    note = f"Llama, {params / 1e6:.1f} M parameters, 2 ranks, {', '.join(steps)}"
    return {
        "lora_memory": figure("adapt: LoRA's peak memory against full fine-tuning (DDP)",
                              memory("lora_ddp"), memory("full_ddp"), note=note, parameters=params),
        "fsdp_memory": figure("adapt: FSDP's peak memory per rank against DDP (full fine-tuning)",
                              memory("full_fsdp"), memory("full_ddp"), note=note),
        "lora_fsdp_memory": figure("adapt: LoRA + FSDP's peak memory against full + DDP",
                                   memory("lora_fsdp"), memory("full_ddp"), note=note),
        "lora_speed": figure("adapt: LoRA's tokens/s against full fine-tuning (DDP)",
                             speed("lora_ddp"), speed("full_ddp"), note=note),
        "fsdp_speed": figure("adapt: FSDP's tokens/s against DDP (full fine-tuning)",
                             speed("full_fsdp"), speed("full_ddp"), note=note),
    }  # fmt: skip


def llama_base(b: Bench):
    """The base to adapt, saved with the bench workspace's tokenizer (so its shards serve as they are)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = b.tmp / "adapt-base"
    if (path / "model.safetensors").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(b.ws.tokenizer_dir)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **LLAMA[b.quick])  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def saved_parameters(base) -> int:
    """The parameter count of a saved model, read from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
