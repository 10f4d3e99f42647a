"""``braintumnet`` command line: thin argparse wrappers over importable functions.

A user's mistake prints one line (what, which file, the fix) and exits non-zero; never a traceback.
Exit codes: 0 ok, 2 usage or user error, 3 some cases quarantined, 4 nothing usable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from braintumnet import __version__
from braintumnet.config import PROFILES as PROFILE_NAMES
from braintumnet.errors import EXIT_USER_ERROR, BrainTumNetError
from braintumnet.postprocess import POSTPROCESS_RULES

log = logging.getLogger("braintumnet")


def _profile(args):
    from braintumnet.config import resolve

    overrides = {"profile": args.profile}
    for key, attr in (("data.img-size", "img_size"), ("data.slices-per-case", "slices_per_case"),
                      ("task", "task"), ("model.gate-region", "gate_region"), ("model.mode", "mode"),
                      ("train.seed", "seed")):
        if getattr(args, attr, None) is not None:
            overrides[key] = getattr(args, attr)
    return resolve(overrides)


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="quick", choices=sorted(PROFILE_NAMES),
                   help="the size and schedule (docs/study.md, 'Profiles and time'; default: quick)")
    p.add_argument("--img-size", type=int, help="override the profile's slice size in pixels")
    p.add_argument("--slices-per-case", type=int, help="override the profile's slices per case")
    p.add_argument("--task", choices=["3class", "binary"], help="classification task (default 3class)")
    p.add_argument("--cache", type=Path, help="prepared-slice cache root (default $BRAINTUMNET_CACHE or "
                                               "./.cache/braintumnet)")


def add_postprocess_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--postprocess", choices=POSTPROCESS_RULES, default=None,
                   help="how a case's predicted labels are cleaned before they are scored or written: largest-lesion "
                        "keeps the largest connected lesion (tumour + edema) of the scan, none keeps every voxel "
                        "(default: the checkpoint's own model.postprocess); score your validation cases with each "
                        "to choose (docs/metrics.md, Post-processing)")


def cmd_phantom(args) -> int:
    from braintumnet.data.phantom import generate_cohort

    summary = generate_cohort(args.out, scale=args.scale, seed=args.seed, fmt=args.format, preview=args.preview,
                              workers=args.workers, test_scale=args.test_scale)
    print(summary.summary())
    return 0


def cmd_init(args) -> int:
    from braintumnet.data.init_site import init_site

    report = init_site(args.site_dir, args.source, site=args.site, series=args.series)
    print(report.summary())
    return 0


def cmd_import_brats(args) -> int:
    from braintumnet.data.brats import import_brats

    report = import_brats(args.brats_dir, args.out_dir, institutions=args.institutions,
                          institution_column=args.institution_column, external_institution=args.external_institution,
                          seed=args.seed, external_fraction=args.external_fraction, test_fraction=args.test_fraction,
                          workers=args.workers, progress=sys.stderr.isatty())
    print(report.summary())
    return report.exit_code


def cmd_check(args) -> int:
    from braintumnet.data.prepare import check_site

    report = check_site(args.site_dir)
    print(report.summary())
    return report.exit_code


def cmd_prepare(args) -> int:
    from braintumnet.data.loading import default_cache_root
    from braintumnet.data.prepare import prepare_site

    profile = _profile(args)
    report = prepare_site(args.site_dir, args.cache or default_cache_root(), profile.data, strict=args.strict,
                          workers=args.workers)
    print(report.summary())
    return report.exit_code


def cmd_train(args) -> int:
    from braintumnet.centralized import train_centralized
    from braintumnet.data.loading import default_cache_root, load_sites

    profile = _profile(args)
    cache = args.cache or default_cache_root()
    sites = load_sites([Path(d) for d in args.data.split(",") if d], cache, profile.data)
    external = load_sites([Path(d) for d in (args.external or "").split(",") if d], cache, profile.data)
    report = train_centralized(sites, profile, args.out, external=external, folds=args.folds, epochs=args.epochs,
                               device=args.device, synthetic=any(s.meta.get("synthetic") for s in sites))
    from braintumnet.report.summary import format_metrics

    print(format_metrics(report))
    print(f"model and metrics written to {Path(args.out).absolute()}")
    return 0


def cmd_evaluate(args) -> int:
    from braintumnet.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.model, [Path(d) for d in args.data.split(",") if d], args.out,
                                 cache_root=args.cache, split=None if args.split == "all" else args.split,
                                 device=args.device, postprocess=args.postprocess)
    from braintumnet.report.summary import format_metrics

    print(format_metrics(report))
    print(f"metrics.json and plots written to {Path(args.out).absolute()}")
    return 0


def cmd_predict(args) -> int:
    from braintumnet.predict import predict

    results = predict(args.model, args.input, args.out, tta=args.tta, device=args.device, task=args.task,
                      postprocess=args.postprocess)
    for r in results:
        print(f"{r['case']}: {r['tumor_type']} (p = {r['probabilities'][r['tumor_type']]:.2f}), "
              f"tumour {r['volume_tumor_ml']:.1f} mL, edema {r['volume_edema_ml']:.1f} mL, report {r['report']}")
    print(f"masks, summaries and reports written to {Path(args.out).absolute()} (research use only, not for "
          "clinical use)")
    return 0


def cmd_certs(args) -> int:
    from braintumnet.certs import make_certs

    report = make_certs(args.folder, dns=args.dns, ips=args.ip, sites=args.site, rotate=args.rotate,
                        keys_only=args.keys_only, force=args.force)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braintumnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # -v is accepted before the subcommand and after it (braintumnet -v train ... or braintumnet train -v ...).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and a traceback for a failure that is not a data or settings problem")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)  # every subcommand takes -v too

    p = command("phantom", help="write the synthetic three-hospital cohort (+ external site)")
    p.add_argument("--out", type=Path, required=True, help="the cohort folder to write (one site folder per hospital)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every count in proportion (default 1)")
    p.add_argument("--test-scale", type=float, default=None,
                   help="hold out the test and external sets of this larger scale: test-only cases added to each "
                        "site, the training cases those of --scale (the study's quick profile uses 0.3 at scale "
                        "0.1: 33 test and 15 external cases instead of 11 and 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default 0)")
    p.add_argument("--format", choices=["nifti", "dicom"], default="nifti",
                   help="write the scans as NIfTI files or as DICOM series (default nifti)")
    p.add_argument("--preview", action="store_true", help="also write preview.png, a contact sheet")
    p.add_argument("--workers", type=int, default=None, help="processes that render cases (default: the CPUs)")
    p.set_defaults(func=cmd_phantom)

    p = command("init", help="write a site's dataset.json and cases.csv from an nnU-Net folder or a DICOM export",
                description="Write SITE_DIR/dataset.json and SITE_DIR/cases.csv from an nnU-Net imagesTr/labelsTr "
                            "folder or a DICOM export (one series per folder) inside SITE_DIR, leaving each case's "
                            "tumor_type and split empty to fill in; never overwrites a file. See docs/data.md.")
    p.add_argument("site_dir", type=Path, help="the site folder; it must hold the export (or a link to it)")
    p.add_argument("--from", dest="source", type=Path, metavar="PATH",
                   help="the nnU-Net folder (with imagesTr) or DICOM export inside SITE_DIR (default: SITE_DIR)")
    p.add_argument("--site", help="the site's name in a new dataset.json (default: the folder's name)")
    p.add_argument("--series", metavar="REGEX",
                   help="DICOM: keep only series whose SeriesDescription matches (e.g. 't1.*(gd|post|\\+c)')")
    p.set_defaults(func=cmd_init)

    p = command("import-brats", help="turn a BraTS release into a pooled site folder with a hospital column",
                description="Write OUT_DIR/dataset.json, cases.csv (with a 'hospital' column) and relabelled masks "
                            "from BraTS 2023 GLI / MET / MEN or BraTS 2021 cases below BRATS_DIR (only read): "
                            "tumour = enhancing + non-enhancing/necrotic core, edema = SNFH/ED. Then "
                            "'python -m simulation --data OUT_DIR'. See docs/data.md, 'BraTS'.")
    p.add_argument("brats_dir", type=Path, help="the folder a BraTS release was unpacked into (one folder per case)")
    p.add_argument("out_dir", type=Path, help="the new pooled site folder (outside BRATS_DIR)")
    p.add_argument("--institutions", type=Path, metavar="CSV",
                   help="a CSV with case_id and an institution column: each institution becomes a hospital "
                        "(default: a seeded split into yibin, plagh, jinling and external)")
    p.add_argument("--institution-column", default="institution",
                   help="the --institutions CSV's column naming each case's institution (default institution)")
    p.add_argument("--external-institution", metavar="NAME",
                   help="with --institutions: the institution held out as the external site (never trained on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hospital and train/test splits (default 0)")
    p.add_argument("--external-fraction", type=float, default=0.2,
                   help="without --institutions: the share of each tumour type held out as external (default 0.2)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="the share of each hospital's cases of each type in its test split (default 0.2)")
    p.add_argument("--workers", type=int, default=1, help="processes that relabel the masks (default 1)")
    p.set_defaults(func=cmd_import_brats)

    p = command("check", help="check a site folder against the data contract; writes nothing")
    p.add_argument("site_dir", type=Path, help="the site folder (dataset.json, cases.csv, images, labels)")
    p.set_defaults(func=cmd_check)

    p = command("prepare", help="check and cache a site's slices (training cases: representative slices; "
                                       "test cases: every slice of the head)")
    p.add_argument("site_dir", type=Path, help="the site folder (dataset.json, cases.csv, images, labels)")
    _add_profile_args(p)
    p.add_argument("--strict", action="store_true", help="any problem is fatal (nothing is cached)")
    p.add_argument("--workers", type=int, default=1, help="processes that read and preprocess cases (default 1)")
    p.set_defaults(func=cmd_prepare)

    p = command("train", help="centralized training on pooled sites")
    p.add_argument("--data", required=True, help="SITE_DIR[,SITE_DIR...]")
    p.add_argument("--out", type=Path, required=True, help="the run folder: model.pt, metrics.json, plots")
    p.add_argument("--external", help="SITE_DIR[,...] evaluated but never trained on")
    p.add_argument("--folds", type=int, default=1, help="k-fold cross-validation on the training cases (paper: 5)")
    p.add_argument("--epochs", type=int, help="override the profile's epochs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--gate-region", choices=["tumor", "edema", "whole"],
                   help="the predicted region the classifier sees (default tumor; the paper's Table 2)")
    p.add_argument("--mode", choices=["multitask", "two-stage"],
                   help="train both tasks together (default) or segmentation first, then classification")
    p.add_argument("--seed", type=int, help="training seed (default: the profile's, 0)")
    _add_profile_args(p)
    p.set_defaults(func=cmd_train)

    p = command("evaluate", help="evaluate a checkpoint on site folders: metrics.json and plots")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint (model.pt, final.pt, round-NNNN.pt)")
    p.add_argument("--data", required=True, help="SITE_DIR[,SITE_DIR...]")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, per-case rows and plots")
    p.add_argument("--split", choices=["test", "train", "all"], default="test",
                   help="which cases of cases.csv to score (default test; all for an external site)")
    p.add_argument("--cache", type=Path, help="prepared-slice cache root (default $BRAINTUMNET_CACHE or "
                                               "./.cache/braintumnet)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_postprocess_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("predict", help="segment and classify new scans: mask NIfTI, JSON summary, one-page PNG report")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint (model.pt, final.pt, round-NNNN.pt)")
    p.add_argument("--input", type=Path, required=True,
                   help="a NIfTI file, a DICOM series folder, or a folder of cases (batch mode)")
    p.add_argument("--out", type=Path, required=True, help="folder for the masks, summaries and reports")
    p.add_argument("--tta", action="store_true", help="average over the four flips of each slice (4x the compute)")
    p.add_argument("--task", choices=["3class", "binary"], help="refuse a checkpoint trained for another task")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_postprocess_option(p)
    p.set_defaults(func=cmd_predict)

    p = command("certs", help="make or reuse the CA, the SuperLink's TLS certificate and the sites' keys",
                       description="Make (or reuse) the federation's CA, the SuperLink's TLS certificate and one "
                                   "SuperNode authentication key pair per site; see deploy/README.md.")
    p.add_argument("folder", type=Path, help="where the files go (created 0700; e.g. /etc/braintumnet/pki)")
    p.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="a host name sites use to reach the SuperLink (repeat; localhost is always added)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="an IP address sites use to reach the SuperLink (repeat; 127.0.0.1, ::1 always added)")
    p.add_argument("--site", action="append", default=[], metavar="NAME",
                   help="make a key pair for this site unless it has one (repeat)")
    p.add_argument("--rotate", action="append", default=[], metavar="NAME",
                   help="replace this site's key pair (the old one goes to a backup folder; repeat)")
    p.add_argument("--keys-only", action="store_true", help="only site key pairs (at a hospital): no CA, no "
                                                            "certificate")
    p.add_argument("--force", action="store_true",
                   help="make a NEW CA although one exists (old files go to a backup folder; sites need the new "
                        "ca.crt)")
    p.set_defaults(func=cmd_certs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrainTumNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a bad setting (size, width, profile): the message names it
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
