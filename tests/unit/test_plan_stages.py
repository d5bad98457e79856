"""The planner's terms for reward and DPO, the process footprint, the allocator setting and the profile
advice, pinned by hand on SmolLM2-135M's shape under the cpu-small-lm profile (issue 25)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.environment import bundled_profiles, load_environment
from tunepipe.tasks.training import memory_plan as mp

GIB = 2**30


def smollm2_config(tied: bool = True, layers: int = 30, vocab: int = 49152):
    """SmolLM2-135M-Instruct's shape (no weights): hidden 576, SwiGLU 1536, 30 blocks, 9 heads / 3 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=vocab, tie_word_embeddings=tied)


LORA = SFTConfig.model_validate({"method": {"name": "lora", "r": 16, "target_modules": "all-linear"}}).method
# Per block, r * (in + out) for q 576->576, k and v 576->192, o 576->576, gate/up 576->1536, down 1536->576.
LORA_PER_BLOCK = 16 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
TRAINABLE = 30 * LORA_PER_BLOCK  # 4,884,480
TOTAL = 134_515_008 + TRAINABLE  # SmolLM2-135M's parameters (tied embeddings) + the adapter


@pytest.fixture(scope="module")
def counted():
    return mp.count(smollm2_config(), LORA)


def test_new_terms_by_hand():
    # TRL's chunk is float32 at any model dtype: 256 tokens x 49,152 x 4 B x 5 copies = 0.234375 GiB.
    assert mp.logits_bytes("chunked_nll", 1024, 49152, 2, float32_head=False) == 256 * 49152 * 20 == 0.234375 * GIB
    # DPO keeps the policy's logits over all 2 x 4 x 256 = 2,048 rows' positions, plus one tensor that size.
    assert mp.logits_bytes("preference", 2048, 49152, 4, float32_head=False) == 2048 * 49152 * 8 == 0.75 * GIB
    assert mp.logits_bytes("preference", 2048, 49152, 2, float32_head=False) == 0.375 * GIB
    # A reward model's head emits one value per position.
    assert mp.logits_bytes("score", 2048, 49152, 4, float32_head=False) == 2048 * 4
    # DPO's reference: TRL's frozen copy of a continued adapter, or a whole second model for a full policy.
    full = SFTConfig.model_validate({"method": "full"}).method
    assert mp.reference_bytes("dpo", LORA, TRAINABLE, TOTAL, 4, 4) == 19_537_920
    assert mp.reference_bytes("dpo", full, TOTAL, TOTAL, 2, 2) == TOTAL * 2
    assert mp.reference_bytes("sft", LORA, TRAINABLE, TOTAL, 4, 4) == mp.reference_bytes("reward", full, TOTAL, TOTAL, 4, 4) == 0


def test_score_head_replaces_an_untied_lm_head_only():
    tied = mp.meta_model(smollm2_config(tied=True, layers=1))
    untied = mp.meta_model(smollm2_config(tied=False, layers=1))
    assert mp.score_head_delta(tied, 576) == 576  # the embedding stays: it is the input embedding too
    assert mp.score_head_delta(untied, 576) == 576 - 49152 * 576


def test_stage_estimates_on_smollm2_under_cpu_small_lm(counted):
    trainable, total, prepared = counted
    assert (trainable, total) == (TRAINABLE, TOTAL)
    env = load_environment("cpu-small-lm")
    assert (env.per_device_batch_size, env.gradient_checkpointing, env.dtype, env.process_memory_gb) == (4, True, "float32", 0.55)
    est = {stage: mp.memory_estimate(prepared, LORA, env, 256, trainable, total, stage=stage) for stage in ("sft", "reward", "dpo")}
    # Checkpointed activations per token: 30 block inputs of 576 float32 values + one block recomputed,
    # (8.5 * 576 + 4 * 1536) * 4 B = 44,160 B: 113,280 B; sft runs 4 x 256 tokens, reward and DPO twice that.
    per_token = 30 * 576 * 4 + 44_160
    assert est["sft"]["activations_gb"] == round(1024 * per_token / GIB, 4) == 0.108
    assert est["reward"]["activations_gb"] == est["dpo"]["activations_gb"] == round(2048 * per_token / GIB, 4)
    assert est["dpo"]["assumptions"]["rows_per_micro_batch"] == 8 and est["sft"]["assumptions"]["rows_per_micro_batch"] == 4
    assert (est["sft"]["logits_gb"], est["reward"]["logits_gb"], est["dpo"]["logits_gb"]) == (0.2344, 0.0, 0.75)
    assert est["dpo"]["reference_gb"] == round(TRAINABLE * 4 / GIB, 4) and est["sft"]["reference_gb"] == 0
    assert est["reward"]["weights_gb"] == round((TOTAL + 576) * 4 / GIB, 4)
    # Hand total for sft: weights 557,597,952 B + gradients 19,537,920 + AdamW 39,075,840 + activations 115,998,720
    # + sdpa bias of one block 4 x 256^2 x 4 = 1,048,576 + logits 251,658,240 = 984,917,248 B, +10%, + 0.55 GiB.
    assert est["sft"]["total_gb"] == round(984_917_248 * 1.1 / GIB + 0.55, 4) == 1.559
    for stage, row in est.items():
        terms = sum(v for k, v in row.items() if k.endswith("_gb") and k not in ("total_gb", "device_memory_gb", "overhead_gb", "process_gb"))
        assert row["total_gb"] == pytest.approx(terms * 1.1 + 0.55, abs=1e-3), stage
        assert row["process_gb"] == 0.55


def test_plan_advice_picks_the_profile_sized_for_the_model():
    profiles = {name: load_environment(name) for name in bundled_profiles()}
    assert mp.recommended_profile(TOTAL, "cpu", profiles) == "cpu-small-lm"
    assert mp.recommended_profile(1_500_000_000, "cpu", profiles) == "cpu-small-lm"
    assert mp.recommended_profile(800_000, "cpu", profiles) == "cpu"  # the quickstart's tiny model
    assert mp.recommended_profile(7_000_000_000, "cpu", profiles) is None
    advised = mp.advice(TOTAL, "cpu", "cpu", profiles)
    assert advised["profile"] == "cpu-small-lm" and advised["is_current"] is False
    assert mp.advice(7_000_000_000, "cpu", "cpu", profiles)["profile"] is None


def test_cli_plans_dpo_and_advises_cpu_small_lm(tmp_path, capsys):
    from tunepipe.flows.cli.main import main

    # config.json only (the planner reads no weights): 2 blocks keep the 2 x 11 profile plans fast; a 180k
    # vocabulary keeps the model above 100M parameters, where cpu-small-lm is the advice.
    smollm2_config(layers=2, vocab=180_000).save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path), "--lora-r", "16", "--target-modules", "all-linear", "--seq-len", "256",
            "--env", "cpu-small-lm", "--host", "cpu", "--json"]
    assert main([*argv, "--stage", "dpo"]) == 0
    dpo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv) == 0
    sft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dpo["advice"] == {"host": "cpu", "profile": "cpu-small-lm", "is_current": True,
                             "reason": "sized for 100,000,000-1,500,000,000 parameters on a cpu host"}
    assert sft["total_params"] > 100_000_000 and sft["memory"]["assumptions"]["stage"] == "sft"
    assert dpo["memory"]["total_gb"] - sft["memory"]["total_gb"] == pytest.approx(
        (dpo["memory"]["logits_gb"] - sft["memory"]["logits_gb"] + dpo["memory"]["activations_gb"] - sft["memory"]["activations_gb"]
         + dpo["memory"]["reference_gb"] + dpo["memory"]["attention_gb"] - sft["memory"]["attention_gb"]) * 1.1, abs=2e-3)


ALLOCATOR_PROBE = """
import ctypes, sys
from tunepipe.tasks.core.environment import apply_allocator_settings, load_environment
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                             "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
applied = apply_allocator_settings(load_environment(sys.argv[1]))
libc.free(libc.malloc(16 << 20))  # freeing an mmapped 16 MiB block raises glibc's dynamic threshold to 16 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)  # a 1 MiB activation-sized block: mmapped only under a fixed threshold
print(applied, libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_profile_fixes_glibc_mmap_threshold():
    def probe(profile: str) -> str:
        done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, profile], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert probe("cpu-small-lm") == ["True", "1"]  # the 1 MiB block is mmapped: given back when freed
    assert probe("cpu") == ["False", "0"]  # glibc's default: it comes from the heap, and stays resident
