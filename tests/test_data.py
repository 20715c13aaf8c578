import pytest
import torch

from serq_ao import data
from tests.conftest import BYTE_VOCAB, make_byte_tokenizer


def test_wiki_splits_follow_the_protocol():
    passages = data.wiki_passages()
    assert len(passages) == 2938
    assert len(set(passages)) == len(passages)
    calibration = data.corpus_documents("wiki", "calibration")
    evaluation = data.corpus_documents("wiki", "evaluation")
    assert (len(calibration), len(evaluation)) == (600, 2338)
    assert calibration + evaluation == passages
    assert not set(calibration) & set(evaluation)
    assert data.corpus_text("wiki", "calibration") == "\n\n".join(calibration)


def test_bbc_articles_in_sorted_path_order_and_disjoint_splits():
    articles = data.bbc_articles()
    assert len(articles) == 2225
    calibration = data.corpus_documents("bbc", "calibration")
    evaluation = data.corpus_documents("bbc", "evaluation")
    assert calibration + evaluation == articles
    assert len(calibration) == 1113
    # sorted path order starts with business/001.txt
    assert articles[0].startswith("Ad sales boost Time Warner profit")


def test_bad_corpus_and_split_are_named():
    with pytest.raises(ValueError, match="corpus must be one of"):
        data.corpus_text("c4", "evaluation")
    with pytest.raises(ValueError, match="split must be one of"):
        data.corpus_text("wiki", "test")


def test_tokenize_adds_no_special_tokens(byte_tokenizer):
    text = "héllo world"
    tokens = data.tokenize(byte_tokenizer, text)
    assert tokens.dtype == torch.long
    assert tokens.numel() == len(text.encode("utf-8"))  # one token per byte, no BOS
    assert byte_tokenizer(text)["input_ids"][0] == byte_tokenizer.bos_token_id  # it would add one


def test_windows_are_consecutive_with_bos_in_front(byte_tokenizer):
    tokens = torch.arange(1000) % BYTE_VOCAB
    windows = data.cut_windows(tokens, seqlen=64)
    assert windows.shape == (15, 64)  # the 40-token remainder is dropped
    for i in range(15):
        assert torch.equal(windows[i], tokens[i * 64 : (i + 1) * 64])
    with_bos = data.add_bos(windows[:3], byte_tokenizer)
    assert with_bos.shape == (3, 65)
    assert (with_bos[:, 0] == byte_tokenizer.bos_token_id).all()
    assert torch.equal(with_bos[:, 1:], windows[:3])


def test_no_bos_tokenizer_leaves_windows_alone():
    tokenizer = make_byte_tokenizer(bos=False)
    windows = torch.arange(128).view(2, 64)
    assert torch.equal(data.add_bos(windows, tokenizer), windows)


def test_window_count_is_checked():
    with pytest.raises(ValueError, match="n_windows must be in"):
        data.cut_windows(torch.arange(100), seqlen=64, n_windows=2)
    with pytest.raises(ValueError, match="seqlen"):
        data.cut_windows(torch.arange(100), seqlen=0)


def test_calibration_and_evaluation_windows_come_from_their_splits(byte_tokenizer):
    calibration = data.calibration_batches(byte_tokenizer, "wiki", n_windows=2, seqlen=32)
    evaluation = data.evaluation_windows(byte_tokenizer, "wiki", n_windows=2, seqlen=32)
    assert calibration.shape == evaluation.shape == (2, 33)
    first_calibration = data.corpus_documents("wiki", "calibration")[0].encode()[:32]
    first_evaluation = data.corpus_documents("wiki", "evaluation")[0].encode()[:32]
    decode = lambda ids: byte_tokenizer.decode(ids).encode()  # noqa: E731
    assert decode(calibration[0, 1:].tolist()) == first_calibration
    assert decode(evaluation[0, 1:].tolist()) == first_evaluation
