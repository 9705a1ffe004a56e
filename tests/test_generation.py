"""Generation samples and task metrics: sharded generation equals plain single-process generation
of the same weights; prompts render as training renders them; bad prompt files name file:line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, explain
from ftcluster.compose import compose_job
from ftcluster.config import ConfigError
from ftcluster.data.errors import DataError
from ftcluster.evaluation.prompts import Prompt, check_prompts_file, load_prompts, prompts_from_rows, render_prompt
from ftcluster.evaluation.task_metrics import normalise, score

TESTS = Path(__file__).resolve().parent

GEN_SCRIPT = r'''
import json, sys
import torch
from ftcluster.distributed import init_distributed, shutdown
from ftcluster.evaluation.generate import generate_samples
from ftcluster.evaluation.prompts import Prompt
from ftcluster.model import build_module, materialize
from ftcluster.parallel import parallelize
from ftcluster.train import _load_tokenizer
sys.path.insert(0, sys.argv[1])
from conftest import compose_job, lm_batch

PROMPTS = [Prompt(messages=[{"role": "user", "content": "Name the capital city of Germany."}]),
           Prompt(text="How many letters are in the word \"fish\"?"),
           Prompt(messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Reverse the word apple."}])]

def lora_b(module, view):
    # peft starts LoRA B at zero (adapters would change nothing): give it seeded values.
    with torch.no_grad():
        for n, p in module.named_parameters():
            if ".lora_B." in n:
                v = view(p)
                full = torch.empty(v.shape).normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
                v.local.copy_(full[v.index] if v.flat is None else full[v.index].reshape(-1)[v.flat])

d = init_distributed()
out = {}
for backend in sys.argv[3:]:
    job = compose_job(f"parallel={backend}", "peft=lora", "train.dtype=fp32", f"launcher.nproc_per_node={d.world_size}")
    tok = _load_tokenizer(job)
    built = build_module(job)
    def fill(m, dev, view):
        materialize(m, cfg=job.model, seed=0, device=dev, shard_view=view)
        lora_b(m, view)
    engine = parallelize(built.module, layers=built.layers, job=job, dist=d, materialize=fill)
    built.module.train()
    together = generate_samples(engine, tokenizer=tok, prompts=PROMPTS, data_cfg=job.data, max_new_tokens=12, device=d.device)
    alone = [generate_samples(engine, tokenizer=tok, prompts=[p], data_cfg=job.data, max_new_tokens=12, device=d.device)[0]
             for p in PROMPTS]
    assert built.module.training, "generate must restore train mode"
    out[backend] = {"together": together, "alone": alone}
if d.rank == 0:
    from ftcluster.model.weights import whole_tensor
    job = compose_job("peft=lora", "train.dtype=fp32")
    plain = build_module(job)
    materialize(plain.module, cfg=job.model, seed=0, device=torch.device("cpu"))
    lora_b(plain.module, whole_tensor)

    class NoEngine:  # the reference: transformers' own generate on the unsharded model, no engine
        def generate(self, ids, mask, *, max_new_tokens, eos_token_id, pad_token_id):
            plain.module.eval()
            with torch.no_grad():
                return plain.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                               do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                               use_cache=True)
    out["reference"] = [generate_samples(NoEngine(), tokenizer=tok, prompts=[p], data_cfg=job.data, max_new_tokens=12,
                                         device=torch.device("cpu"))[0] for p in PROMPTS]
    open(sys.argv[2] + "/gen.json", "w").write(json.dumps(out))
shutdown()
'''


@pytest.mark.slow
def test_two_rank_generation_equals_single_process_generation(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", sys.executable, "-c", GEN_SCRIPT, str(TESTS), str(tmp_path), "fsdp2", "zero3"],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    out = json.loads((tmp_path / "gen.json").read_text())
    ref = [s["completion"] for s in out["reference"]]
    assert len(set(ref)) == 3 and all(ref)  # three different, non-empty continuations
    for backend in ("fsdp2", "zero3"):
        assert [s["completion"] for s in out[backend]["together"]] == ref, backend  # left padding changes nothing
        assert [s["completion"] for s in out[backend]["alone"]] == ref, backend


def test_chat_prompt_renders_as_the_training_prefix_before_the_answer() -> None:
    from ftcluster.data import formats
    from ftcluster.train import _load_tokenizer

    job = compose_job()
    tok = _load_tokenizer(job)
    conv = [{"role": "user", "content": "Name the capital city of Germany."},
            {"role": "assistant", "content": "The capital of Germany is Berlin."}]
    ids, mask = formats.build_encoder(job.data, tokenizer=tok)({"messages": [conv]}, [0])[0]
    first_supervised = mask.index(True)
    got = render_prompt(Prompt(messages=conv[:1]), tokenizer=tok, data_cfg=job.data)
    assert got == ids[:first_supervised]
    assert render_prompt(Prompt(text=conv[0]["content"]), tokenizer=tok, data_cfg=job.data) == got


def test_prompts_from_rows_per_format() -> None:
    job = compose_job()
    chat = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    [p] = prompts_from_rows([chat], job.data)
    assert [m["content"] for m in p.messages] == ["q1", "a1", "q2"] and p.reference == "a2"
    import dataclasses

    pc = dataclasses.replace(job.data, format="prompt_completion")
    assert prompts_from_rows([{"prompt": "2+2=", "completion": "4"}], pc) == [Prompt(text="2+2=", reference="4")]
    al = prompts_from_rows([{"instruction": "Add", "input": "2 2", "output": "4"}],
                           dataclasses.replace(job.data, format="alpaca"))
    assert "Add" in al[0].text and "2 2" in al[0].text and al[0].reference == "4"
    assert prompts_from_rows([{"text": "x"}], dataclasses.replace(job.data, format="text")) == []


@pytest.mark.parametrize("content, where, what", [
    (b'{"prompt": "ok"}\n{"prompt": broken\n', ":2:", "malformed JSON"),
    (b'{"prompt": "ok"}\n\n{"reference": "only"}\n', ":3:", "needs \"messages\""),
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', ":2:", "not valid UTF-8"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}\n', ":1:", "role must be one of"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path: Path, content: bytes, where: str, what: str) -> None:
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        check_prompts_file(str(f))
    assert f"{f}{where}" in str(e.value) and what in str(e.value)


def test_prompt_file_loads_and_a_bad_one_fails_at_compose(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi", "reference": "hello"}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    ps = load_prompts(compose_job(f"eval.prompts_path={good}").eval)
    assert ps == [Prompt(text="hi", reference="hello"), Prompt(messages=[{"role": "user", "content": "q"}])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\nnot json\n')
    with pytest.raises(ConfigError, match=f"{bad}:2: malformed JSON"):
        compose_job(f"eval.prompts_path={bad}")
    with pytest.raises(ConfigError, match="^eval.prompts_path: no such file"):
        compose_job(f"eval.prompts_path={tmp_path / 'missing.jsonl'}")


def test_task_metrics_exact_match_and_rouge_l_by_hand() -> None:
    samples = [{"completion": "The cat sat.", "reference": "the cat sat"},      # EM 1, ROUGE-L 1
               {"completion": "the cat sat", "reference": "the cat sat down"},  # EM 0, LCS 3: P=1, R=3/4
               {"completion": "anything", "reference": None}]                    # ignored
    got = score(samples)
    assert got["eval_exact_match"] == 0.5
    assert got["eval_rougeL"] == pytest.approx((1.0 + 2 * 1 * 0.75 / (1 + 0.75)) / 2)
    assert normalise("  An Apple, the pear!  ") == "apple pear"
    assert score([{"completion": "x", "reference": None}]) == {}
