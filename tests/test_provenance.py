"""Provenance: a resumed or cached result is reused only for the model (content identity, or endpoint + served
name) and settings that produced it; records and summaries name that model; `serve --adapter` says so too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from fake_server import ChatServer
from probllm.cli import app
from probllm.lm import BackendConfig, make_backend, run_ordered
from probllm.models import model_identity

PARAMS = {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
MCQ = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "choices": [str(i), str(2 * i), str(3 * i)],
        "answer": "B", "source": "arc"} for i in range(4)]


def save_adapter(base: str, folder: Path, seed: int) -> str:
    """A LoRA adapter with non-zero B matrices (so it changes the outputs), saved like `dpo` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from probllm.models import load_model

    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(folder)
    return str(folder)


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_output_resumes_only_for_the_model_and_settings_that_wrote_it(tiny_model_dir, tmp_path):
    src = tmp_path / "mcq.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MCQ))
    out, summary = tmp_path / "preds.jsonl", tmp_path / "s.json"
    code, _, err = run("eval", "--model", tiny_model_dir, "--limit", "2", "-o", out, "--summary", summary, src)
    assert code == 0, err
    first = read(out)
    identity = model_identity(tiny_model_dir)
    assert all(r["provenance"]["model_id"] == identity.id and r["provenance"]["method"] == "loglik"
               for r in first)
    written = json.loads(summary.read_text())
    # The summary names the model and carries per-item correctness for `report`'s paired test.
    assert written["model_id"] == identity.id and written["item_correct"] == {r["id"]: r["correct"] for r in first}

    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"rms_norm_eps": 1e-06',
                                                                                   '"rms_norm_eps": 1e-05'))
    for args, says in ((["--model", other], f"there, {other} (sha256:"),
                       (["--model", tiny_model_dir, "--adapter", adapter], "+adapter:sha256:"),
                       (["--model", tiny_model_dir, "--method", "letter"], "method loglik there, letter in this run"),
                       (["--model", tiny_model_dir, "--dtype", "bfloat16"], "dtype float32 there, bfloat16")):
        code, _, err = run("eval", *args, "-o", out, src)
        lines = [line for line in err.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and "not resuming" in lines[0] and says in lines[0], err
        assert "--force-resume" in lines[0]
        assert read(out) == first  # nothing mixed in

    # The same weights under another path are the same model: it resumes.
    same = tmp_path / "same-weights"
    shutil.copytree(tiny_model_dir, same)
    code, _, err = run("eval", "--model", same, "--limit", "3", "-o", out, src)
    assert code == 0 and "2 skipped (already in --output" in err, err
    # Knowingly: --force-resume resumes with another model (and says so).
    code, _, err = run("eval", "--model", other, "--force-resume", "-o", out, src)
    assert code == 0 and "1 skipped" not in err and "3 skipped (already in --output" in err, err
    assert "resuming anyway" in err
    final = read(out)
    assert [r["id"] for r in final] == ["q0", "q1", "q2", "q3"]
    assert final[3]["provenance"]["model_id"] == model_identity(str(other)).id != identity.id


def chats(backend, prompts):
    async def one(p):
        return await backend.chat([{"role": "user", "content": p}], PARAMS)

    return list(run_ordered(prompts, one, window=8, backend=backend))


def test_response_cache_misses_after_the_adapter_in_a_folder_changes(tiny_model_dir, tmp_path):
    adapter = save_adapter(tiny_model_dir, tmp_path / "dpo", seed=1)
    config = BackendConfig(backend="hf", model=tiny_model_dir, adapter=adapter, cache=tmp_path / "c.sqlite")
    first = make_backend(config)
    chats(first, ["Entropy measures"])
    again = make_backend(config)
    chats(again, ["Entropy measures"])
    assert again.cache_hits == 1 and again.requests == 0
    # `dpo --overwrite` into the same folder: same path, new weights; the old answer must not come back.
    save_adapter(tiny_model_dir, tmp_path / "dpo", seed=2)
    retrained = make_backend(config)
    chats(retrained, ["Entropy measures"])
    assert retrained.cache_hits == 0 and retrained.requests == 1
    assert retrained.identity != first.identity and "+adapter:sha256:" in retrained.identity


def test_response_cache_misses_when_base_url_changes(tmp_path):
    cache = tmp_path / "c.sqlite"
    with ChatServer() as one, ChatServer() as two:
        def backend(server):
            return make_backend(BackendConfig(backend="openai", model="fake-model", base_url=server.base_url,
                                              cache=cache, retry_base=0.01))

        chats(backend(one), ["What is 2 + 2?"])
        assert sum(one.seen.values()) == 1
        same = backend(one)
        chats(same, ["What is 2 + 2?"])
        assert same.cache_hits == 1 and sum(one.seen.values()) == 1
        chats(backend(two), ["What is 2 + 2?"])  # same served name, another server: asked, not read back
        assert sum(two.seen.values()) == 1
        # corrupt's pairs name the endpoint they came from, as the cache keys it.
        src = tmp_path / "qa.jsonl"
        src.write_text(json.dumps({"id": 1, "question": "What is 2 + 2?",
                                   "answer": "It is 4, because two and two make four."}) + "\n")
        result = CliRunner().invoke(app, ["corrupt", "--backend", "openai", "--model", "fake-model", "--base-url",
                                          two.base_url, "--cache", str(cache), str(src)], catch_exceptions=False)
        pairs = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(pairs) == 1, result.stderr
        assert pairs[0]["corruption_model_id"] == f"endpoint:{two.base_url.rstrip('/')}#fake-model"


def test_serve_with_adapter_lists_a_distinct_model_name(tiny_model_dir, tmp_path):
    from openai import OpenAI

    from servers import probllm_serve

    adapter = save_adapter(tiny_model_dir, tmp_path / "dpo", seed=1)
    with probllm_serve("--model", tiny_model_dir, "--adapter", adapter) as (url, _proc, _lines):
        names = [m.id for m in OpenAI(base_url=url, api_key="none").models.list().data]
    assert names == [f"{tiny_model_dir.rstrip('/')}+{adapter}"]
    assert names[0] != tiny_model_dir


def test_ask_output_resumes_only_for_the_same_model_index_and_settings(tiny_model_dir, notes_index, tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": i, "question": f"What is heapsort {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "answers.jsonl"
    base = ["ask", "--model", tiny_model_dir, "--max-new-tokens", "3", "--index", notes_index, "-o", out]
    code, _, err = run(*base, "--limit", "2", "-i", src)
    assert code == 0, err
    first = read(out)
    generation = json.loads((Path(notes_index) / "manifest.json").read_text())["generation"]
    assert all(r["provenance"]["model_id"] == model_identity(tiny_model_dir).id and
               r["provenance"]["index"]["generation"] == generation for r in first)
    code, _, err = run(*base, "--temperature", "0.7", "-i", src)
    assert code == 2 and "not resuming: temperature 0.0 there, 0.7 in this run" in err, err
    code, _, err = run(*base[:5], "-o", out, "-i", src)  # no --index: the answers would quote nothing
    assert code == 2 and "not resuming: index" in err, err
    assert read(out) == first
    code, _, err = run(*base, "-i", src)
    assert code == 0 and "2 skipped (already answered in --output" in err, err
    assert [r["id"] for r in read(out)] == [0, 1, 2]
