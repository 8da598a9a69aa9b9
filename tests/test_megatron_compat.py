"""Megatron-LM and ALCF command lines parse unchanged and mean what they say (megatron_ext/compat.py's tables and
the schema's fields for Megatron-LM's flags)."""

from __future__ import annotations

import pytest

from megatron_ext.compat import NO_EFFECT, NOT_BUILT, REFUSED
from megatron_ext.config import Config, ConfigError, build_parser, check_built, parse_args, startup_note

RUN = ["--train-iters", "2"]


def _value_for(flag: str) -> list[str]:
    """A command-line value that NO_EFFECT/NOT_BUILT's `flag` accepts and that is not one of its `fine` values."""
    accepted = {**NO_EFFECT, **NOT_BUILT}[flag]
    if accepted.takes is None:
        return [flag]
    if accepted.choices:
        return [flag, next(c for c in accepted.choices if c not in accepted.fine)]
    return [flag, "2"]


@pytest.mark.parametrize(
    "argv,feature",
    [
        (["--num-experts", "8"], "--num-experts is not supported (mixture of experts)"),
        (["--moe-router-topk=2"], "--moe-router-topk is not supported (mixture of experts)"),
        (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size is not supported (mixture of experts)"),
        (["--experimental-attention-variant", "gated_delta_net"], "(gated delta net"),
        (["--linear-num-key-heads", "4"], "(gated delta net"),
        (["--enable-gpt-oss"], "--enable-gpt-oss is not supported (gpt-oss)"),
        (["--window-size", "128"], "(gpt-oss"),
        (["--export-kd-teacher-load", "x"], "--export-kd-teacher-load is not supported (ModelOpt"),
    ],
)
def test_out_of_scope_flags_are_refused_in_one_line_before_any_other_check(argv, feature, capsys) -> None:
    # A bad value and an unknown flag earlier on the line: the refusal still comes first.
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-layers", "x", "--unknown-flag", *argv, *RUN])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and feature in err and err.count("\n") == 1, err


def test_no_schema_flag_is_taken_for_an_out_of_scope_one() -> None:
    flags = [s for a in build_parser()._actions for s in a.option_strings]
    from megatron_ext.compat import refused_feature

    assert [f for f in flags if refused_feature(f)] == []
    assert set(REFUSED).isdisjoint(flags)


def test_prefix_abbreviations_are_off(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--num-lay", "3", *RUN])  # argparse's default would bind it to --num-layers
    assert "unrecognized arguments: --num-lay 3" in capsys.readouterr().err


def test_every_no_effect_flag_parses_and_appears_in_the_note_with_its_reason() -> None:
    argv = [w for flag in NO_EFFECT for w in _value_for(flag)]
    cfg = parse_args([*argv, *RUN])
    note = startup_note(cfg)
    assert note is not None
    for flag, accepted in NO_EFFECT.items():
        if accepted.takes is None and True in accepted.fine:  # a switch asking for what happens here anyway
            assert f"  {flag}:" not in note, flag
        else:
            assert f"  {flag}" in note and accepted.reason in note, flag
    check_built(cfg)  # no-effect flags never stop the run
    assert startup_note(parse_args(RUN)) is None
    # A value that asks for what happens here anyway is no news.
    assert startup_note(parse_args(["--ckpt-format", "torch_dist", "--rerun-mode", "disabled", *RUN])) is None


@pytest.mark.parametrize("flag", list(NOT_BUILT))
def test_a_flag_not_built_here_parses_and_stops_the_run_naming_it(flag) -> None:
    cfg = parse_args([*_value_for(flag), *RUN])
    with pytest.raises(ConfigError, match=f"^{flag}( \\S+)? is not built here"):
        check_built(cfg)


def test_readings_as_megatron_lm_reads_them() -> None:
    cfg = parse_args(["--sequence-parallel", "--data-path", "a", "--data-file-list", "l.txt", *RUN])
    assert not cfg.parallel.sequence_parallel and cfg.data.data_path is None and cfg.data.data_file_list == ["l.txt"]
    note = startup_note(cfg) or ""
    assert "--sequence-parallel is off" in note and "--data-path is ignored" in note
    assert parse_args(["--sequence-parallel", "--tensor-model-parallel-size", "2", *RUN]).parallel.sequence_parallel


def test_legacy_spellings() -> None:
    cfg = parse_args(["--checkpoint-activations", "--rotary-position-embeddings-theta", "500000", *RUN])
    assert cfg.training.recompute_activations and cfg.model.rotary_base == 500000
    assert (cfg.training.recompute_granularity, cfg.training.recompute_method) == ("full", "uniform")
    note = startup_note(cfg) or ""
    assert note.count("--recompute-activations recomputes whole layers here") == 1, note
    assert startup_note(Config.from_dict(cfg.to_dict())) == note  # read back from config.json: said once


# ---- a dozen command lines written from Megatron-LM's and ALCF's documented examples --------------------------

GPT3_175B = (  # examples/gpt3/train_gpt3_175b_distributed.sh, its length in iterations (no sample ramp-up)
    "--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048 "
    "--attention-backend auto --micro-batch-size 1 --global-batch-size 1536 --train-iters 500000 --weight-decay 0.1 "
    "--adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 "
    "--lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000 "
    "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 --data-path /data/gpt_text_document "
    "--vocab-file /data/gpt2-vocab.json --merge-file /data/gpt2-merges.txt --split 949,50,1 --log-interval 100 "
    "--save-interval 10000 --eval-interval 1000 --save /ckpt --load /ckpt --eval-iters 10 --tensorboard-dir /tb "
    "--tokenizer-type GPT2BPETokenizer --use-mcore-models --transformer-impl transformer_engine"
)
LLAMA3_8B_FP8 = [  # examples/llama/train_llama3_8b_h100_fp8.sh, with --split's quotes inside the argument
    *(
        "--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
        "--group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192 "
        "--max-position-embeddings 8192 --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 "
        "--attention-dropout 0.0 --hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused "
        "--apply-layernorm-1p --untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 1 "
        "--global-batch-size 128 --train-samples 1953125000 --lr-decay-samples 1949218748 "
        "--lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 "
        "--lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 "
        "--grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc "
        "--empty-unused-memory-level 1 --exit-duration-in-mins 235 --fp8-format hybrid --fp8-amax-history-len 1024 "
        "--fp8-amax-compute-algo max --fp8-param-gather --tensor-model-parallel-size 1 "
        "--pipeline-model-parallel-size 1 --context-parallel-size 2 --sequence-parallel --use-distributed-optimizer "
        "--overlap-grad-reduce --overlap-param-gather --mock-data --no-create-attention-mask-in-dataloader "
        "--no-mmap-bin-files --num-workers 1 --tokenizer-type NullTokenizer --vocab-size 128256 --split"
    ).split(),
    "'99,1,0'",
    *"--eval-iters 32 --eval-interval 100 --save-interval 1000 --ckpt-format torch_dist".split(),
    *"--distributed-timeout-minutes 60".split(),
]
FUNCTIONAL_TEST = (  # tests/functional_tests/test_cases/gpt/*/model_config.yaml: the dense GPT settings
    "--num-layers 12 --hidden-size 512 --num-attention-heads 8 --seq-length 1024 --max-position-embeddings 1024 "
    "--micro-batch-size 4 --global-batch-size 32 --train-iters 50 --lr 0.00015 --lr-decay-iters 320000 "
    "--lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2 --clip-grad 1.0 --lr-warmup-fraction .01 "
    "--split 949,50,1 --tokenizer-type GPT2BPETokenizer --vocab-file v.json --merge-file m.txt --data-path d "
    "--deterministic-mode --no-gradient-accumulation-fusion --attention-softmax-in-fp32 --use-mcore-models "
    "--ckpt-format torch_dist --dist-ckpt-strictness log_all --use-persistent-ckpt-worker "
    "--ckpt-fully-parallel-load --no-ckpt-fully-parallel-save --auto-detect-ckpt-format "
    "--dist-ckpt-optim-fully-reshardable --transformer-impl local --attention-backend unfused --bf16 "
    "--rerun-mode validate_results --eval-global-batch-size 32 --verify-integrity --cross-entropy-fusion-impl te "
    "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 2 "
    "--decoder-last-pipeline-num-layers 2 --recompute-granularity full --recompute-method uniform "
    "--recompute-num-layers 1 --no-rope-fusion --rotary-interleaved --position-embedding-type rope "
    "--defer-embedding-wgrad-compute --wgrad-deferral-limit 2 --accumulate-allreduce-grads-in-fp32"
)
MEGATRON_FSDP = (  # examples/megatron_fsdp
    "--num-layers 4 --hidden-size 256 --num-attention-heads 4 --train-iters 10 --use-megatron-fsdp "
    "--data-parallel-sharding-strategy optim_grads_params --no-gradient-accumulation-fusion "
    "--use-distributed-optimizer --ckpt-format fsdp_dtensor --init-model-with-meta-device --use-nccl-ub "
    "--fsdp-double-buffer --fsdp-manual-registration --mock-data"
)
SC21 = (  # examples/academic_paper_scripts/sc21: legacy spellings
    "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 --num-layers 24 --hidden-size 2048 "
    "--num-attention-heads 32 --micro-batch-size 4 --global-batch-size 512 --seq-length 2048 "
    "--max-position-embeddings 2048 --train-iters 100 --checkpoint-activations --activations-checkpoint-method "
    "uniform --checkpoint-num-layers 2 --DDP-impl local --lr 0.00015 --min-lr 1.0e-5 --lr-decay-style cosine "
    "--weight-decay 1e-2 --clip-grad 1.0 --lr-warmup-fraction .01 --fp16 --vocab-file v.json --merge-file m.txt "
    "--tokenizer-type GPT2BPETokenizer --data-path d"
)
ALCF_LLAMA = (  # argonne-lcf/Megatron-DeepSpeed helpers.sh (the flags that are not DeepSpeed's or logging's)
    "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 --num-key-value-heads 8 "
    "--seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 1 --global-batch-size 8 "
    "--train-iters 1000 --optimizer adamw --lr 0.0002 --lr-warmup-fraction 0.05 --lr-decay-style cosine "
    "--use-rotary-position-embeddings --rotary-position-embeddings-theta 500000 --no-query-key-layer-scaling "
    "--shuffle-sample-in-corpus --word-embedding-init-std 0.0125 --adjust-word-embedding-init "
    "--normalization rmsnorm --swiglu --untie-embeddings-and-output-weights --disable-bias-linear "
    "--no-bias-gelu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion --no-gradient-accumulation-fusion "
    "--no-async-tensor-model-parallel-allreduce --use-flash-attn-v2 --bf16 --data-file-list list.txt "
    "--data-path d --tokenizer-type HFTokenizer --tokenizer-model /tok/llama --split 990,10,0"
)


def test_gpt3_175b_line() -> None:
    cfg = parse_args(GPT3_175B.split())
    m, p, d = cfg.model, cfg.parallel, cfg.data
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (96, 12288, 96, 2048)
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (8, 16) and cfg.precision.fp16
    assert (d.tokenizer_type, d.vocab_file, d.merge_file) == (
        "GPT2BPETokenizer",
        "/data/gpt2-vocab.json",
        "/data/gpt2-merges.txt",
    )
    assert cfg.schedule.lr_decay_iters == 430000 and cfg.schedule.lr_warmup_fraction == 0.001
    assert set(cfg.compat.given) == {"--use-mcore-models", "--transformer-impl"}


def test_llama3_8b_fp8_line() -> None:
    cfg = parse_args(LLAMA3_8B_FP8)
    m, o, p, prec, d = cfg.model, cfg.optimizer, cfg.parallel, cfg.precision, cfg.data
    assert m.apply_layernorm_1p and m.attention_backend == "auto" and m.position_embedding_type == "rope"
    assert (o.decoupled_lr, o.decoupled_min_lr) == (5.0e-4, 4.5e-5)
    assert (prec.fp8_format, prec.fp8_amax_history_len, prec.fp8_amax_compute_algo) == ("hybrid", 1024, "max")
    assert prec.fp8_param_gather and p.grad_reduce_in_bf16 and p.context_parallel_size == 2
    assert not p.sequence_parallel  # TP 1: switched off, as Megatron-LM does
    assert d.split == "99,1,0" and d.mock_data and (d.tokenizer_type, d.vocab_size) == ("NullTokenizer", 128256)
    note = startup_note(cfg) or ""
    for flag in ("--manual-gc", "--overlap-param-gather", "--calculate-per-token-loss", "--cross-entropy-loss-fusion"):
        assert f"  {flag}" in note
    assert "--ckpt-format" not in note  # torch_dist is what is written
    with pytest.raises(ConfigError, match="^--context-parallel-size 2 is not built here"):
        check_built(cfg, transformer_engine_gpu=True)
    cfg.parallel.context_parallel_size = 1
    with pytest.raises(ConfigError, match="^--fp8-format hybrid needs Transformer Engine on a GPU"):
        check_built(cfg)
    check_built(cfg, transformer_engine_gpu=True)


def test_functional_test_line() -> None:
    cfg = parse_args(FUNCTIONAL_TEST.split())
    t, p, m = cfg.training, cfg.parallel, cfg.model
    assert t.deterministic_mode and (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    assert (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers) == (2, 2)
    assert m.rotary_interleaved and m.attention_backend == "unfused"
    assert (
        cfg.compat.given["--dist-ckpt-strictness"] == "log_all"
        and cfg.compat.given["--rerun-mode"] == "validate_results"
    )
    check_built(cfg)


def test_megatron_fsdp_line_parses_and_stops_at_start_up() -> None:
    cfg = parse_args(MEGATRON_FSDP.split())
    assert cfg.compat.given["--ckpt-format"] == "fsdp_dtensor" and cfg.parallel.use_distributed_optimizer
    with pytest.raises(ConfigError, match="^--use-megatron-fsdp is not built here"):
        check_built(cfg)


def test_sc21_legacy_line() -> None:
    cfg = parse_args(SC21.split())
    t = cfg.training
    assert t.recompute_activations and (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == (
        "full",
        "uniform",
        2,
    )
    assert cfg.compat.given["--DDP-impl"] == "local" and "--DDP-impl local" in (startup_note(cfg) or "")


def test_alcf_llama_line() -> None:
    cfg = parse_args(ALCF_LLAMA.split())
    m, d = cfg.model, cfg.data
    assert cfg.optimizer.optimizer == "adam" and m.rotary_base == 500000 and m.position_embedding_type == "rope"
    assert m.word_embedding_init_std == 0.0125 and m.num_query_groups == 8 and m.attention_backend == "sdpa"
    assert (d.tokenizer_type, d.tokenizer_model, d.data_file_list, d.data_path) == (
        "HFTokenizer",
        "/tok/llama",
        ["list.txt"],
        None,
    )
    note = startup_note(cfg) or ""
    assert "--data-path is ignored" in note and "--no-query-key-layer-scaling" in note


@pytest.mark.parametrize(
    "line,fields",
    [
        ("--attention-backend flash", {"attention_backend": "sdpa"}),
        ("--attention-backend local", {"attention_backend": "unfused"}),
        ("--no-position-embedding", {"position_embedding_type": "none"}),
        ("--no-position-embedding --position-embedding-type rope", {"position_embedding_type": "rope"}),
        ("--squared-relu", {"squared_relu": True}),
    ],
)
def test_model_flag_lines(line: str, fields: dict) -> None:
    m = parse_args([*line.split(), *RUN]).model
    assert {k: getattr(m, k) for k in fields} == fields


@pytest.mark.parametrize(
    "line,message",
    [
        ("--decoder-first-pipeline-num-layers 1", "needs --pipeline-model-parallel-size > 1"),
        ("--num-layers 4 --pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 1", "must split evenly"),
        ("--recompute-method block", "need --recompute-granularity full"),
        ("--decoupled-min-lr 1e-5", "--decoupled-min-lr needs --decoupled-lr"),
        ("--tokenizer-type GPT2BPETokenizer --vocab-file v.json", "needs --merge-file"),
        ("--tokenizer-type NullTokenizer", "needs --vocab-size"),
        ("--mock-data --data-path d", "--mock-data trains on synthetic data"),
        ("--swiglu --squared-relu", "not both"),
        ("--apply-layernorm-1p --normalization RMSNorm", "--apply-layernorm-1p is for --normalization LayerNorm"),
    ],
)
def test_mistakes_in_megatron_flags_name_the_flag(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args([*line.split(), *RUN])


def test_the_config_command_reads_no_file_a_flag_names(tmp_path, capsys) -> None:
    from megatron_ext import config

    missing = str(tmp_path / "nowhere")
    config.main(["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", missing, "--merge-file", missing, *RUN])
    assert f'"vocab_file": "{missing}"' in capsys.readouterr().out


# ---- the effect of each implemented flag --------------------------------------------------------------------


def _gpt2_files(folder) -> tuple[str, str]:
    """A tiny GPT-2 vocab.json/merges.txt pair: the 256 byte symbols, a few merges, <|endoftext|>."""
    import json

    # GPT-2's byte -> symbol table: printable bytes stand for themselves, the others for chr(256 + n).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("in", "g"), ("Ġa", "n")]
    vocab = {s: i for i, s in enumerate([*symbols, *("".join(m) for m in merges), "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return str(folder / "vocab.json"), str(folder / "merges.txt")


TEXT = "the thing ran 3 times: an angle, then the end!\n  Été"


def test_gpt2_bpe_from_vocab_and_merges_gives_gpt2_tokenizer_fast_ids(tmp_path) -> None:
    from transformers import GPT2TokenizerFast

    from megatron_ext.data.tokenizers import tokenizer_of

    vocab, merges = _gpt2_files(tmp_path)
    cfg = parse_args(["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, *RUN])
    tok, ref = tokenizer_of(cfg.data), GPT2TokenizerFast.from_pretrained(str(tmp_path))  # reads the same two files
    ids = tok.tokenize(TEXT)
    assert ids == ref.encode(TEXT) and len(ids) < len(TEXT.encode())  # the merges apply
    assert tok.eod == ref.convert_tokens_to_ids("<|endoftext|>") == tok.vocab_size - 1 == 263
    assert tok.detokenize([*ids, tok.eod]) == TEXT


def test_hf_tokenizer_folder_as_alcf_passes_it(tmp_path) -> None:
    from transformers import GPT2TokenizerFast

    from megatron_ext.data.tokenizers import tokenizer_of

    _gpt2_files(tmp_path)
    ref = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    ref.save_pretrained(str(tmp_path / "tok"))
    cfg = parse_args(["--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(tmp_path / "tok"), *RUN])
    tok = tokenizer_of(cfg.data)
    assert tok.tokenize(TEXT) == ref.encode(TEXT) and tok.eod == ref.eos_token_id


def test_null_llama2_and_tiktoken_tokenizers(tmp_path) -> None:
    from megatron_ext.data.tokenizers import TokenizerError, build_tokenizer

    null = build_tokenizer("NullTokenizer", None, vocab_size=100)
    assert (null.tokenize("5 17 99"), null.eod, null.vocab_size) == ([5, 17, 99], 100, 101)
    assert null.detokenize([5, 17, 100]) == "5 17"
    with pytest.raises(TokenizerError, match="id 100 is outside --vocab-size 100"):
        null.tokenize("100")
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text("\n".join(f"line {i} of some text, {i * 7} words" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=60)
    llama = build_tokenizer("Llama2Tokenizer", str(tmp_path / "sp.model"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert llama.tokenize("line 3 of text") == sp.encode("line 3 of text") and llama.eod == sp.eos_id()
    cfg = parse_args(
        ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "t.json", "--tiktoken-pattern", "v2", *RUN]
    )
    assert cfg.data.tiktoken_pattern == "v2"
    with pytest.raises(TokenizerError, match="TikTokenizer is not built here"):
        build_tokenizer("TikTokenizer", "t.json")


def test_layernorm_1p_is_zero_centred_gamma() -> None:
    import torch
    import torch.nn.functional as F

    from megatron_ext.models.gpt import LayerNorm1P, TorchNorm, transformer_config
    from megatron_ext.platform import select

    config = transformer_config(parse_args(["--apply-layernorm-1p", *RUN]), select("cpu", "gloo"))
    norm = TorchNorm(config, 8)
    assert isinstance(norm, LayerNorm1P) and torch.equal(norm.weight, torch.zeros(8))
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x), F.layer_norm(x, (8,), norm.weight + 1, norm.bias, 1e-5))
    plain = TorchNorm(transformer_config(parse_args(RUN), select("cpu", "gloo")), 8)
    assert type(plain) is torch.nn.LayerNorm and torch.equal(plain.weight, torch.ones(8))


def test_squared_relu_and_interleaved_rope_against_closed_forms() -> None:
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd as rope

    from megatron_ext.models.gpt import transformer_config
    from megatron_ext.platform import select

    plat = select("cpu", "gloo")
    config = transformer_config(parse_args(["--squared-relu", "--rotary-interleaved", *RUN]), plat)
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(config.activation_func(x), torch.relu(x) ** 2) and config.rotary_interleaved
    # RoPE over interleaved pairs (x0,x1),(x2,x3): pair j turns by angle theta_j, whose frequencies megatron-core
    # lays out as [f0, f0, f1, f1] for interleaved pairs.
    t = torch.randn(5, 1, 1, 4)
    theta = torch.tensor([0.3, 1.1])
    freqs = theta.repeat_interleave(2).expand(5, 1, 1, 4) * torch.arange(1, 6).view(5, 1, 1, 1)
    got = rope(t, freqs, rotary_interleaved=config.rotary_interleaved)  # megatron-core's unfused RoPE
    angle = theta * torch.arange(1, 6).view(5, 1, 1, 1)
    a, b = t[..., 0::2], t[..., 1::2]
    want = torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1).flatten(-2)
    assert torch.allclose(got, want, atol=1e-6)
    plain = transformer_config(parse_args(RUN), plat)
    assert not torch.allclose(rope(t, freqs, rotary_interleaved=plain.rotary_interleaved), want, atol=1e-3)


TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
    "--global-batch-size 4 --log-interval 1 --eval-iters 1 --eval-interval 2 --lr-decay-style constant"
).split()


@pytest.fixture
def single_process(monkeypatch, tmp_path):
    """An in-process world of one (as loop.main runs it), torn down afterwards."""
    import torch

    from megatron_ext import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield tmp_path
    distributed.destroy()
    torch.use_deterministic_algorithms(False)


def test_megatron_flags_reach_the_model_optimizer_and_buffers(single_process, monkeypatch) -> None:
    """--decoupled-lr reaches the embedding and output layer's group (not the others), --grad-reduce-in-bf16 the
    gradient buffers, --deterministic-mode torch, --word-embedding-init-std the embedding, --apply-layernorm-1p
    and --squared-relu the layers, --eval-global-batch-size the evaluation; the model trains on --mock-data with
    the NullTokenizer's vocabulary."""
    import torch

    from megatron_ext.models.gpt import LayerNorm1P
    from megatron_ext.training import loop
    from megatron_ext.training.loop import evaluate, setup, train_step

    flags = "--mock-data --tokenizer-type NullTokenizer --vocab-size 61 --make-vocab-size-divisible-by 1 --lr 1e-3 "
    flags += "--decoupled-lr 5e-3 --bf16 --grad-reduce-in-bf16 --deterministic-mode --word-embedding-init-std 0.5 "
    flags += "--apply-layernorm-1p --squared-relu --untie-embeddings-and-output-weights --train-iters 3 "
    flags += "--eval-global-batch-size 8"
    cfg = parse_args([*TINY, *flags.split(), "--data-cache-path", str(single_process / "cache")])
    tr = setup(cfg)
    assert torch.are_deterministic_algorithms_enabled()
    gpt = tr.model[0].module.module  # DDP -> Float16Module -> GPTModel
    embedding = gpt.embedding.word_embeddings.weight
    assert embedding.shape[0] == 62 and 0.4 < float(embedding.float().std()) < 0.6
    assert any(isinstance(m, LayerNorm1P) for m in gpt.modules())
    assert tr.model[0].ddp_config.grad_reduce_in_fp32 is False
    assert {b.grad_dtype for b in tr.model[0].buffers} == {torch.bfloat16}
    losses = [train_step(tr)["lm_loss"] for _ in range(2)]
    assert all(abs(x - torch.log(torch.tensor(61.0)).item()) < 1.5 for x in losses), losses
    lr_of = {id(p): g["lr"] for o in tr.optimizer.chained_optimizers for g in o.optimizer.param_groups
             for p in g["params"]}  # fmt: skip
    main_params = {
        name: mp for o in tr.optimizer.chained_optimizers
        for name, mp in zip(_names(gpt, o), (p for g in o.optimizer.param_groups for p in g["params"]))
    }  # fmt: skip
    decoupled = {n for n, mp in main_params.items() if lr_of[id(mp)] == 5e-3}
    assert decoupled == {"embedding.word_embeddings.weight", "output_layer.weight"}, decoupled
    assert all(lr_of[id(mp)] == 1e-3 for n, mp in main_params.items() if n not in decoupled)
    counts: list[int] = []
    run = loop._run_microbatches
    monkeypatch.setattr(
        loop, "_run_microbatches", lambda tr, data, n, forward_only: counts.append(n) or run(tr, data, n, forward_only)
    )
    evaluate(tr)
    assert counts == [4]  # --eval-global-batch-size 8 of micro-batches of 2 (the training batch is 4)


def _names(model, optimizer) -> list[str]:
    """Names of the model parameters behind an optimizer's main (fp32) parameters, group by group."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.float16_groups for p in g]


def test_a_pasted_line_trains_on_mock_data_and_prints_the_note_once(single_process, capsys) -> None:
    from megatron_ext.training import loop

    cache = single_process / "cache"
    argv = [*TINY, "--mock-data", "--train-iters", "2", "--data-cache-path", str(cache), "--use-mcore-models"]
    assert loop.main([*argv, "--no-gradient-accumulation-fusion", "--ckpt-format", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: Megatron-LM flags with no effect here") == 1
    assert "  --ckpt-format torch: checkpoints are written as torch_dist" in out and "  --use-mcore-models" in out
    assert "iter 2/2" in out and list((cache / "mock").glob("mock_*.idx"))


def test_a_flag_not_built_here_stops_the_run_before_anything_starts(single_process, capsys) -> None:
    from megatron_ext.training import loop

    save = single_process / "ckpt"
    assert loop.main([*TINY, "--mock-data", "--train-iters", "2", "--use-megatron-fsdp", "--save", str(save)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --use-megatron-fsdp is not built here") and err.count("\n") == 1
    assert not save.exists()


def test_step_batch_size_schedule_steps_the_global_batch_by_consumed_tokens(single_process) -> None:
    from megatron_ext.training.loop import setup, train_step

    cfg = parse_args(
        [*TINY, "--mock-data", "--train-samples", "40", "--data-cache-path", str(single_process / "cache")]
        + ["--global-batch-size", "8", "--step-batch-size-schedule", "'0:2 96:4 160:8'"]
    )  # seq 16: 96 tokens = 6 samples, 160 = 10
    assert cfg.training.batch_size_steps() == [(0, 2), (96, 4), (160, 8)]
    tr = setup(cfg)
    batches = []
    while tr.state.consumed_samples < 40:
        before = tr.state.consumed_samples
        train_step(tr)
        batches.append(tr.state.consumed_samples - before)
    assert batches == [2, 2, 2, 4, 8, 8, 8, 8]
    with pytest.raises(ConfigError, match="differs from the last batch size 8"):
        parse_args([*TINY, "--train-samples", "40", "--global-batch-size", "4", "--step-batch-size-schedule", "0:8"])


def test_save_retain_interval_keeps_the_multiples(tmp_path) -> None:
    from megatron_ext.training.checkpointing import _retain

    for keep, interval, left in [(None, 4, [10, 8, 4]), (2, 4, [10, 9, 8, 4]), (2, None, [10, 9])]:
        root = tmp_path / f"{keep}-{interval}"
        for i in range(1, 11):
            (root / f"iter_{i:07d}").mkdir(parents=True)
        _retain(root, keep, interval)
        assert sorted((int(p.name[5:]) for p in root.iterdir()), reverse=True) == left
    assert parse_args(["--save-retain-interval", "1000", *RUN]).checkpoint.save_retain_interval == 1000


def test_preprocess_data_takes_gpt2_vocab_and_merges(tmp_path) -> None:
    """tools/preprocess_data.py with Megatron-LM's --vocab-file/--merge-file, through two worker processes."""
    import json

    from megatron_ext.data.indexed import read_documents
    from megatron_ext.data.preprocess import main
    from megatron_ext.data.tokenizers import build_tokenizer

    vocab, merges = _gpt2_files(tmp_path)
    docs = [TEXT, "then the thing", "an angle in the end"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"), "--append-eod"]
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, "--workers", "2"]
    assert main([*argv, "--quiet"]) == 0
    tok = build_tokenizer("GPT2BPETokenizer", None, vocab_file=vocab, merge_file=merges)
    written = [d.tolist() for d in read_documents(tmp_path / "out_text_document")]
    assert written == [[*tok.tokenize(d), tok.eod] for d in docs]


def test_hugging_face_export_refuses_interleaved_rope() -> None:
    from megatron_ext.convert.hf import llama_blockers

    llama = "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear".split()
    assert llama_blockers(parse_args([*llama, *RUN]).model) == []
    blockers = llama_blockers(parse_args([*llama, "--rotary-interleaved", *RUN]).model)
    assert blockers == ["--rotary-interleaved (Llama rotates the two halves of each head)"]
