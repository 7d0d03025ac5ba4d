"""The published SSAT / FGCR command lines, with only the script name changed to train.py,
parse as their users mean them. (Runs of these shapes are in test_train.py.)"""

import shlex

import pytest

from ssat.config import NO_EFFECT, parse_config

# argv after the script name, verbatim from the FGCR README (and the SSAT README after it)
FGCR = {
    "finetune MAE ViT-T": "-u --data_path imagenet --resume mae_vit_tiny.pth",
    "finetune FGCR ViT-S": "-u --views 3 --data_path flowers102 --resume mae_vit_small.pth",
    "eval MAE ViT-T": "--data_path imagenet --resume mae_vit_tiny_ft.pth --eval --model vit_tiny",
    "eval FGCR ViT-T": (
        "--data_path imagenet --resume fgcr_vit_tiny.pth --eval --model mae_vit_tiny"
    ),
    # torch.distributed.launch puts --local-rank=N first
    "8 GPUs": (
        "--local-rank=3 --data_path imagenet --version FGCR --epochs 100 --model mae_vit_tiny"
    ),
    "one GPU FGCR": (
        "--data_path imagenet --nb_classes 1000 --model mae_vit_tiny --views 3 --version FGCR "
        "--epochs 100"
    ),
    "one GPU scratch": (
        "--data_path imagenet --nb_classes 1000 --model vit_tiny --version scratch --epochs 100"
    ),
    "SSAT 8 GPUs": (
        "--local_rank=0 --data_path /path/to/imagenet/ --output_dir ./output_dir --epochs 100 "
        "--model mae_vit_tiny"
    ),
    "SSAT eval": (
        "--data_path /path/to/imagenet/ --resume vitsmall-ssat_imagenet1k_weights.pth --eval "
        "--model mae_vit_small"
    ),
}


def _parse(line: str):
    return parse_config(shlex.split(line)).resolve(cuda=False)


def test_fgcr_readme_commands():
    cfg = {name: _parse(line) for name, line in FGCR.items()}
    tune = cfg["finetune MAE ViT-T"]
    assert (tune.data_path, tune.resume, tune.no_effect) == ("imagenet", "mae_vit_tiny.pth", ["u"])
    fgcr = cfg["finetune FGCR ViT-S"]
    assert (fgcr.mask_views, fgcr.method, fgcr.data_path) == (3, "fgcr", "flowers102")
    for name, model, method in [
        ("eval MAE ViT-T", "vit_tiny", "scratch"),
        ("eval FGCR ViT-T", "mae_vit_tiny", "ssat"),
        ("SSAT eval", "mae_vit_small", "ssat"),
    ]:
        assert (cfg[name].eval, cfg[name].model, cfg[name].method) == (True, model, method)
    multi = cfg["8 GPUs"]
    assert (multi.version, multi.output_dir, multi.epochs) == ("FGCR", "output/FGCR", 100)
    assert multi.no_effect == ["local_rank"] and multi.method == "ssat"
    one = cfg["one GPU FGCR"]
    assert (one.nb_classes, one.mask_views, one.method, one.output_dir) == (
        1000,
        3,
        "fgcr",
        "output/FGCR",
    )
    scratch = cfg["one GPU scratch"]
    assert (scratch.method, scratch.mixup, scratch.cutmix) == ("scratch", 0.8, 1.0)
    ssat = cfg["SSAT 8 GPUs"]
    assert (ssat.output_dir, ssat.data_path) == ("./output_dir", "/path/to/imagenet/")


# every flag of main_two_branch.py / main_scratch.py of both codebases, with a value of its kind
EVERY_FLAG = (
    "--batch_size 32 --epochs 5 --num_workers 2 --accum_iter 2 --model mae_vit_tiny "
    "--norm_pix_loss --input_size 64 --patch_size 8 --mask_ratio 0.75 --views 2 "
    "--lambda_weight 0.1 --sim_beta 0.001 --drop_path 0.1 --clip_grad 1.0 --weight_decay 0.05 "
    "--lr 1e-3 --blr 1e-3 --layer_decay 0.65 --min_lr 1e-6 --warmup_epochs 2 --color_jitter 0.4 "
    "--aa rand-m7-mstd0.5-inc1 --smoothing 0.1 --reprob 0.25 --remode pixel --recount 1 "
    "--resplit --mixup 0.8 --cutmix 1.0 --cutmix_minmax 0.2 0.8 --mixup_prob 1.0 "
    "--mixup_switch_prob 0.5 --mixup_mode batch --finetune mae.pth --global_pool --cls_token "
    "--frozen_emb --data_path c10 --nb_classes 10 --subset_size 0.5 --perturb_perspective "
    "--version v1 --output_dir out --log_dir logs --device cpu --seed 2025 --resume '' "
    "--start_epoch 0 --eval --dist_eval --pin_mem --no_pin_mem --world_size 1 --local_rank 0 "
    "--distributed True --dist_on_itp --dist_url env://"
)


def test_every_published_flag_is_accepted_with_its_meaning():
    cfg = _parse(EVERY_FLAG)
    assert (cfg.batch_size, cfg.accum_iter, cfg.img_size, cfg.patch_size) == (32, 2, 64, 8)
    assert (cfg.mask_views, cfg.method, cfg.layer_decay, cfg.clip_grad) == (2, "fgcr", 0.65, 1.0)
    assert cfg.frozen_emb and cfg.perturb_perspective and cfg.norm_pix_loss
    assert not cfg.global_pool  # --cls_token came after --global_pool
    assert (cfg.device, cfg.subset_size, cfg.version, cfg.log_dir) == ("cpu", 0.5, "v1", "logs")
    assert (cfg.finetune, cfg.output_dir, cfg.seed) == ("mae.pth", "out/v1", 2025)
    assert sorted(cfg.no_effect) == sorted({*NO_EFFECT, "color_jitter"} - {"u"})
    assert _parse("--distributed").no_effect == ["distributed"]  # without its value too


@pytest.mark.parametrize("flag", ["--token_size 16", "--vis_mask_ratio 0.25", "--mask_regular"])
def test_swin_and_pvt_flags_say_so(flag):
    with pytest.raises(ValueError, match="Swin/PVT backbones"):
        parse_config(flag.split())


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "expected cuda, cuda:N or cpu"), ("cuda:x", "expected cuda, cuda:N or cpu")],
)
def test_bad_device_names(device, message):
    from ssat import distributed

    with pytest.raises(ValueError, match=message):
        distributed.setup(device)
