"""Training batches depend only on (seed, step); replicas split rows; padding for sequence
parallelism changes nothing that the loss sees."""

from __future__ import annotations

import json

import pytest
import torch

from tensorpar.errors import TensorparError
from tensorpar.train.data import (IGNORE_INDEX, batch_for_step, check_data, pack_rows, pad_sequence, replica_rows,
                                  tokenize_file)

TOKENS = torch.arange(1000)


def test_batches_are_windows_of_next_tokens_and_depend_only_on_seed_and_step():
    x, y = batch_for_step(TOKENS, seed=1, step=5, batch=4, seq_len=16)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # TOKENS[i] == i, so each label is the next token
    x2, _ = batch_for_step(TOKENS, seed=1, step=5, batch=4, seq_len=16)
    assert torch.equal(x, x2)
    assert not torch.equal(x, batch_for_step(TOKENS, seed=1, step=6, batch=4, seq_len=16)[0])
    assert not torch.equal(x, batch_for_step(TOKENS, seed=2, step=5, batch=4, seq_len=16)[0])


def test_windows_stay_inside_the_data():
    x, y = batch_for_step(torch.arange(17), seed=0, step=1, batch=8, seq_len=16)
    assert torch.equal(x, torch.arange(16).expand(8, 16)) and int(y.max()) == 16


def test_replica_rows_tile_the_batch():
    assert [replica_rows(8, 4, d) for d in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(TensorparError, match="--batch 6 must be a multiple of --dp 4"):
        replica_rows(6, 4, 0)


def test_pad_sequence_pads_the_end_with_ignored_labels():
    x, y = torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)
    px, py, _ = pad_sequence(x, y, 3)
    assert px.shape == (2, 9) and torch.equal(px[:, :7], x) and py[:, 7:].eq(IGNORE_INDEX).all()
    assert pad_sequence(x, y, 7)[0] is x


def test_data_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(TensorparError, match="is not a file"):
        tokenize_file(tmp_path / "missing.txt", None)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TensorparError, match="is empty"):
        tokenize_file(tmp_path / "empty.txt", None)
    with pytest.raises(TensorparError, match="fewer than --seq-len \\+ 1 = 65"):
        check_data(torch.arange(10), 64, 100, "tiny.txt")
    with pytest.raises(TensorparError, match="token id 120 is outside the model's vocabulary of 100"):
        check_data(torch.arange(121), 64, 100, "big.txt")


def test_chat_examples_learn_the_assistant_turns_only(tokenizer, tmp_path):
    from tensorpar.train.data import read_examples

    path = tmp_path / "chat.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Of Italy?"},
            {"role": "assistant", "content": "Rome."}]
    path.write_text(json.dumps({"messages": chat}) + "\n\n" + json.dumps({"text": "Tensor parallelism"}) + "\n")
    examples = read_examples(path, tokenizer, 96, tokenizer.eos_token_id)
    ids, targets = examples.ids, examples.targets
    assert ids.shape == targets.shape == (2, 97)
    learned = [t for t in targets[0].tolist() if t != IGNORE_INDEX]
    turn_end = tokenizer.decode(tokenizer.apply_chat_template(chat[:3], tokenize=True, return_dict=False)[-2:])
    # each assistant turn's content and the tokens that close it; nothing of the system or user turns
    assert tokenizer.decode(learned) == "Paris." + turn_end + "Rome." + turn_end
    text = [t for t in targets[1].tolist() if t != IGNORE_INDEX]
    assert text == tokenizer("Tensor parallelism")["input_ids"] + [tokenizer.eos_token_id]
    assert examples.learned == len(learned) + len(text) - 1  # (a row's first token is no label)
    inputs, labels = examples.batch(seed=0, step=1, batch=3)
    assert inputs.shape == labels.shape == (3, 96)
    for row in range(3):  # a label is the next input token wherever it is learned
        keep = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][:-1][keep[:-1]], inputs[row][1:][keep[:-1]])


@pytest.mark.parametrize("line, says", [
    ("not json", ":1: not JSON"),
    ('{"prompt": "x"}', ':1: each line must be an object with "text"'),
    ('{"messages": [{"role": "user"}]}', ':1: "messages" must be a list'),
])
def test_a_bad_jsonl_line_is_named(tokenizer, tmp_path, line, says):
    from tensorpar.train.data import read_examples

    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(TensorparError, match=says):
        read_examples(path, tokenizer, 16, None)


def test_the_eval_split_holds_out_the_last_examples_or_tokens():
    from tensorpar.train.data import Examples, split_eval

    ids = torch.arange(30).view(10, 3)
    train, (x, y) = split_eval(Examples(ids, ids + 100), 0.2, 2)
    assert torch.equal(train.ids, ids[:8]) and torch.equal(x, ids[8:, :-1]) and torch.equal(y, ids[8:, 1:] + 100)
    train, (x, y) = split_eval(torch.arange(100), 0.1, 4)
    assert torch.equal(train, torch.arange(90)) and x.tolist() == [[90, 91, 92, 93], [94, 95, 96, 97]]
    assert y.tolist() == [[91, 92, 93, 94], [95, 96, 97, 98]]
    with pytest.raises(TensorparError, match="leaves none of the 1 rows of examples"):
        split_eval(Examples(ids[:1], ids[:1]), 0.5, 2)


def test_pack_rows_first_fit_decreasing_whole_examples():
    """Rows of 6: the longest first, each into the first row with room; within a row in file
    order, numbered; an example's first token unlearned; padding is document -1."""
    examples = [([1, 2], [1, 2]), ([3, 4, 5, 6], [3, 4, 5, 6]), ([7, 8, 9], [-100, 8, 9]), ([10, 11], [10, 11])]
    packed = pack_rows(examples, 6)
    assert packed.ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert packed.documents.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, -1]]
    assert packed.targets.tolist() == [[-100, 2, -100, 4, 5, 6], [-100, 8, 9, -100, 11, -100]]
    inputs, labels, documents = packed.rows(slice(None))
    assert inputs.shape == labels.shape == documents.shape == (2, 5)
