"""prepare-dataset: formats and their detection, loss masks, malformed rows, truncation, splits,
every kind of source, and the deterministic (resumable, packable) batch order."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from finetune_api.spec import DatasetSpec, S3Spec, TrainingSpec
from finetune_trainer.data import chat_templates
from finetune_trainer.data.prepare import load_split, prepare
from finetune_trainer.errors import ConfigError
from finetune_trainer.train.batching import IGNORE, Batches
from tests.trainer_fixtures import OFFLINE_ENV, tiny_gemma, write_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_gemma()))


@pytest.fixture(scope="module")
def template(tokenizer):
    return chat_templates.resolve("auto", tokenizer)


def run_prepare(tokenizer, template, out: Path, source: str | None = None, **kw):
    training = TrainingSpec(**{k: kw.pop(k) for k in list(kw) if k in TrainingSpec.model_fields})
    dataset = DatasetSpec(source=source, **kw) if source else DatasetSpec(**kw)
    return prepare(dataset, training, tokenizer, template, out, parity_samples=4)


def labelled_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE])


@pytest.mark.parametrize("name, fmt", [
    ("alpaca-mini.jsonl", "alpaca"), ("messages-mini.jsonl", "messages"), ("sharegpt-mini.jsonl", "sharegpt"),
    ("prompt-completion-mini.jsonl", "prompt-completion"), ("text-mini.jsonl", "text"),
])
def test_each_format_is_detected_and_prepared(tokenizer, template, tmp_path, name, fmt):
    report = run_prepare(tokenizer, template, tmp_path, str(EXAMPLES / name), validation_split=0.25)
    lines = (EXAMPLES / name).read_text().splitlines()
    assert report["format"] == fmt
    assert report["rows"]["read"] == report["rows"]["used"] == len(lines)
    assert report["rows"]["malformed"] == report["rows"]["truncated"] == 0
    assert report["rows"]["train"] + report["rows"]["validation"] == len(lines)
    assert report["rows"]["validation"] == round(len(lines) * 0.25)
    assert report["tokens"]["lengthPercentiles"]["p50"] > 0
    train = load_split(tmp_path, "train")
    assert len(train) == report["rows"]["train"]
    for row in train:
        assert row["input_ids"][0] == tokenizer.bos_token_id
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    source_rows = [json.loads(line) for line in lines]
    responses = {r.get("output") or r.get("completion") or r.get("text") or
                 (r.get("messages") or r.get("conversations"))[-1].get("content", (r.get("conversations") or [{}])[-1].get("value"))
                 for r in source_rows}
    learned = labelled_text(tokenizer, train[0])
    if fmt in ("alpaca", "messages", "sharegpt"):
        # Only the assistant's words and the end-of-turn marker carry loss.
        assert learned.endswith("<end_of_turn>\n")
        assert learned.removesuffix("<end_of_turn>\n").strip() in {r.strip() for r in responses}
    else:
        assert learned.endswith("<eos>")
        assert learned.removesuffix("<eos>") in responses


def test_gemma3_template_folds_the_system_prompt_into_the_first_user_turn(tokenizer, template):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}], chat_template=template.jinja, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n")
    assert template.name == "gemma3" and template.stop == "<end_of_turn>"


def test_train_on_all_tokens_labels_the_prompt_too(tokenizer, template, tmp_path):
    run_prepare(tokenizer, template, tmp_path, str(EXAMPLES / "alpaca-mini.jsonl"), train_on_responses_only=False)
    row = load_split(tmp_path, "train")[0]
    assert row["labels"] == row["input_ids"]


def test_ambiguous_or_unknown_columns_are_errors_naming_them(tokenizer, template, tmp_path):
    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "a", "messages": [{"role": "user", "content": "b"}]}])
    with pytest.raises(ConfigError) as err:
        run_prepare(tokenizer, template, tmp_path / "o1", str(both))
    assert err.value.reason == "InvalidDataset"
    assert "[messages, text]" in err.value.message and "messages, text" in err.value.message
    assert "dataset.format" in err.value.message

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError) as err:
        run_prepare(tokenizer, template, tmp_path / "o2", str(odd))
    assert "[answer, question]" in err.value.message and "instruction, output" in err.value.message

    # An explicit format resolves the ambiguity.
    report = run_prepare(tokenizer, template, tmp_path / "o3", str(both), format="text")
    assert report["format"] == "text"


def test_malformed_rows_are_reported_with_row_numbers_and_counted(tokenizer, template, tmp_path):
    good = [json.loads(line) for line in (EXAMPLES / "alpaca-mini.jsonl").read_text().splitlines()]
    rows = good[:10] + ['{"instruction": "broken json"'] + good[10:20] + [{"instruction": "no output"}] + good[20:]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    report = run_prepare(tokenizer, template, tmp_path / "out", str(src))
    assert report["rows"]["read"] == 26 and report["rows"]["malformed"] == 2 and report["rows"]["used"] == 24
    assert [e["row"] for e in report["malformedRows"]] == [11, 22]
    assert "not valid JSON" in report["malformedRows"][0]["reason"]
    assert "missing output" in report["malformedRows"][1]["reason"]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_mostly_malformed_data_fails_the_run(tokenizer, template, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}] * 3 + [  # no assistant turn
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        run_prepare(tokenizer, template, tmp_path / "out", str(src))
    assert err.value.reason == "InvalidDataset"
    assert "4 of 5 rows are malformed" in err.value.message
    assert "row 1: 'messages' has no non-empty assistant turn" in err.value.message


def test_truncated_rows_and_rows_left_without_labels_are_counted(tokenizer, template, tmp_path):
    long_answer = {"instruction": "Say hi.", "input": "", "output": "hi " * 40}
    long_prompt = {"instruction": "word " * 60, "input": "", "output": "ok"}
    src = write_jsonl(tmp_path / "long.jsonl", [long_answer, long_prompt] + [
        json.loads(line) for line in (EXAMPLES / "alpaca-mini.jsonl").read_text().splitlines()[:6]])
    report = run_prepare(tokenizer, template, tmp_path / "out", str(src), max_seq_length=32)
    assert report["rows"]["truncated"] >= 2
    assert report["rows"]["noTrainableTokens"] == 1  # the long prompt's answer fell off the end
    assert report["tokens"]["lengthPercentiles"]["max"] > 32
    assert all(r["length"] <= 32 for r in load_split(tmp_path / "out", "train"))


def test_parity_rows_are_held_out_even_without_a_validation_split(tokenizer, template, tmp_path):
    src = write_jsonl(tmp_path / "many.jsonl", [{"text": f"row number {i}"} for i in range(40)])
    report = run_prepare(tokenizer, template, tmp_path / "out", str(src))
    assert (report["rows"]["train"], report["rows"]["validation"], report["rows"]["parity"]) == (36, 0, 4)
    assert not report["parityFromTrain"]
    report = run_prepare(tokenizer, template, tmp_path / "out2", str(src), validation_split=0.1, max_samples=20)
    assert (report["rows"]["used"], report["rows"]["train"], report["rows"]["validation"]) == (20, 18, 2)


# ------------------------------------------------------------------------------------- sources
def test_configmap_rows_from_the_mounted_file(tokenizer, template, tmp_path, monkeypatch):
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    mounted = tmp_path / "etc" / "rows.json"
    mounted.parent.mkdir()
    mounted.write_text(json.dumps(rows))  # a JSON array, as a ConfigMap value may hold
    monkeypatch.setenv("FINETUNE_DATASET_FILE", str(mounted))
    report = run_prepare(tokenizer, template, tmp_path / "out", config_map_ref={"name": "rows", "key": "rows.json"})
    assert report["source"] == "configmap:rows/rows.json"
    assert report["format"] == "prompt-completion" and report["rows"]["used"] == 2

    monkeypatch.setenv("FINETUNE_DATASET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as err:
        run_prepare(tokenizer, template, tmp_path / "out2", config_map_ref={"name": "rows", "key": "rows.json"})
    assert err.value.reason == "DatasetNotFound" and "ConfigMap rows key rows.json" in err.value.message


def test_https_source(tokenizer, template, tmp_path):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(EXAMPLES), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        report = run_prepare(tokenizer, template, tmp_path / "out", f"{url}/sharegpt-mini.jsonl")
        assert report["format"] == "sharegpt" and report["rows"]["used"] == 12
        with pytest.raises(ConfigError) as err:
            run_prepare(tokenizer, template, tmp_path / "out2", f"{url}/nope.jsonl")
        assert err.value.reason == "DatasetNotFound" and "HTTP 404" in err.value.message
    finally:
        server.shutdown()


@pytest.mark.parametrize("url, hub", [
    ("https://huggingface.co/datasets/o/d/resolve/main/a.jsonl", True),
    ("https://cdn-lfs.huggingface.co/x/a.jsonl", True),
    ("https://HuggingFace.co./x.jsonl", True),
    ("https://evil.example/huggingface.co.jsonl", False),
    ("https://evil.example/?to=huggingface.co", False),
    ("https://huggingface.co.evil.example/a.jsonl", False),
    ("https://evilhuggingface.co/a.jsonl", False),
    ("https://evil.example#@huggingface.co/a.jsonl", False),
    ("http://huggingface.co/a.jsonl", False),  # the token never travels in clear text
])
def test_only_the_hub_is_a_hub_url(url, hub):
    from finetune_trainer.data.sources import is_hub_url

    assert is_hub_url(url) is hub


def test_hf_token_is_never_sent_to_a_url_that_only_mentions_the_hub(tmp_path, monkeypatch):
    from finetune_trainer.data.sources import _download_https

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = b'{"text": "hi"}\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        _download_https(f"http://127.0.0.1:{port}/huggingface.co.jsonl", tmp_path)
        _download_https(f"http://127.0.0.1:{port}/x.jsonl?mirror=https://huggingface.co/", tmp_path)
    finally:
        server.shutdown()
    assert seen == [None, None]


def test_a_redirect_off_the_hub_drops_the_token():
    import urllib.request

    from finetune_trainer.data.sources import _TokenStaysOnTheHub

    req = urllib.request.Request("https://huggingface.co/d/resolve/main/a.jsonl",
                                 headers={"Authorization": "Bearer hf_secret"})
    handler = _TokenStaysOnTheHub()
    away = handler.redirect_request(req, None, 302, "Found", {}, "https://evil.example/a.jsonl")
    assert not away.has_header("Authorization")
    stays = handler.redirect_request(req, None, 302, "Found", {}, "https://cdn-lfs.huggingface.co/a.jsonl")
    assert stays.get_header("Authorization") == "Bearer hf_secret"


def test_s3_source(tokenizer, template, tmp_path, s3, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    s3.client().upload_file(str(EXAMPLES / "messages-mini.jsonl"), bucket, "data/chat.jsonl")
    spec = S3Spec(bucket=bucket, endpoint=s3.endpoint, force_path_style=True)
    report = prepare(DatasetSpec(source=f"s3://{bucket}/data/chat.jsonl"), TrainingSpec(), tokenizer, template,
                     tmp_path / "out", s3=spec)
    assert report["format"] == "messages" and report["rows"]["used"] == 12
    report = prepare(DatasetSpec(source=f"s3://{bucket}/data/"), TrainingSpec(), tokenizer, template,
                     tmp_path / "out2", s3=spec)
    assert report["rows"]["used"] == 12
    with pytest.raises(ConfigError) as err:
        prepare(DatasetSpec(source=f"s3://{bucket}/data/missing.jsonl"), TrainingSpec(), tokenizer, template,
                tmp_path / "out3", s3=spec)
    assert err.value.reason == "ObjectNotFound"


def test_local_folder_csv_parquet_and_saved_datasets(tokenizer, template, tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [json.loads(line) for line in (EXAMPLES / "alpaca-mini.jsonl").read_text().splitlines()]
    folder = tmp_path / "csv"
    folder.mkdir()
    with open(folder / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows[:12])
    pq.write_table(pa.Table.from_pylist(rows[12:]), folder / "b.parquet")
    report = run_prepare(tokenizer, template, tmp_path / "out", str(folder))
    assert report["format"] == "alpaca" and report["rows"]["used"] == 24

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    report = run_prepare(tokenizer, template, tmp_path / "out2", str(tmp_path / "saved"))
    assert report["rows"]["used"] == 24


def test_hub_dataset_offline_and_not_cached_is_a_clear_error(tokenizer, template, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ConfigError) as err:
        run_prepare(tokenizer, template, tmp_path / "out", "nobody/no-such-dataset")
    assert err.value.reason == "DatasetNotFound" and "nobody/no-such-dataset" in err.value.message
    with pytest.raises(ConfigError) as err:
        run_prepare(tokenizer, template, tmp_path / "out", "/no/such/file.jsonl")
    assert err.value.reason == "DatasetNotFound"


# ------------------------------------------------------------------------------------- batches
def rows_of(lengths: list[int]) -> list[dict]:
    return [{"input_ids": list(range(100 * i, 100 * i + n)), "labels": list(range(100 * i, 100 * i + n))}
            for i, n in enumerate(lengths)]


def test_batch_order_is_a_pure_function_of_the_micro_batch_index():
    rows = rows_of([5, 7, 3, 9, 4, 6, 8])
    a, b = Batches(rows, 2, 32, 0, seed=1), Batches(rows, 2, 32, 0, seed=1)
    assert a.per_epoch == 4
    # A resumed run asks for micro-batch 9 directly and must get what an unbroken run got there.
    seq = [a.get(m).input_ids.tolist() for m in range(12)]
    assert b.get(9).input_ids.tolist() == seq[9]
    assert sorted(r[0] for batch in seq[:4] for r in batch if r[0] or r[1]) == [0, 100, 200, 300, 400, 500, 600]
    assert seq[:4] != seq[4:8]  # every row once per epoch, in a new order each epoch


def test_padding_and_loss_masks():
    batch = Batches(rows_of([3, 5]), 2, 32, pad_id=0, seed=0).get(0)
    assert batch.input_ids.shape == (2, 5)
    assert batch.attention_mask.sum().item() == 8 and batch.tokens == 8
    assert (batch.labels == IGNORE).sum().item() == 2 + 2  # two pads and each row's first token
    assert batch.label_tokens == 8 - 2


def test_packing_restarts_positions_and_never_predicts_across_rows():
    batches = Batches(rows_of([5, 7, 3, 9]), 1, 16, pad_id=0, seed=0, packing=True)
    assert batches.per_epoch < 4  # rows share sequences
    for m in range(batches.per_epoch):
        b = batches.get(m)
        assert b.attention_mask is None  # transformers builds the block-diagonal mask from position_ids
        starts = (b.position_ids[0] == 0).nonzero().flatten().tolist()
        for s in starts:
            assert b.labels[0, s].item() == IGNORE
        assert b.input_ids.shape[1] <= 16


def test_bucketed_batches_pad_to_power_of_two_widths():
    from finetune_trainer.train.batching import Batches

    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 70, 130, 250)]
    widths = {Batches(rows, 1, 256, pad_id=0, seed=0, bucket=True).get(m).input_ids.shape[1] for m in range(4)}
    assert widths == {64, 128, 256}  # never wider than max_seq_length
    plain = Batches(rows[:1], 1, 256, pad_id=0, seed=0).get(0)
    assert plain.input_ids.shape[1] == 5 and plain.tokens == 5


def test_every_format_of_the_api_is_detected_by_its_columns():
    from typing import get_args

    from finetune_api.spec import DatasetFormat
    from finetune_trainer.data.formats import SIGNATURES

    assert set(SIGNATURES) == set(get_args(DatasetFormat)) - {"auto"}
