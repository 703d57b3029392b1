import math

import pytest
import torch
import torch.nn.functional as F

from sds_exp.evaluation.perplexity import eval_token_ids, perplexity


def test_perplexity_is_exp_mean_window_nll(tiny_llama):
    model = tiny_llama.model
    ids = torch.randint(0, len(tiny_llama.tokenizer), (2 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=32)
    assert result.nwindows == 2  # the 7-token tail is dropped
    nll = []
    with torch.no_grad():
        for w in ids[:64].view(2, 32):
            logits = model(w[None]).logits[0, :-1]
            nll.append(F.cross_entropy(logits, w[1:]).item())
    assert result.ppl == pytest.approx(math.exp(sum(nll) / 2), rel=1e-5)
    assert perplexity(model, ids, seqlen=32, max_windows=1).nwindows == 1


def test_wikitext2_windows_with_smollm2_tokenizer(smollm2_tokenizer, data_dir):
    ids = eval_token_ids("wikitext2", smollm2_tokenizer, data_dir, 2048)
    assert ids.numel() == 304_986
    assert ids.numel() // 2048 == 148
    with pytest.raises(ValueError, match="allowed: wikitext2, c4"):
        eval_token_ids("ptb", smollm2_tokenizer, data_dir, 2048)
