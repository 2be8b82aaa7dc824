"""``onestep import-llamagen``, ``onestep import-dd1`` and ``onestep import-var``: published weights as run
directories (:mod:`onestep.importers`)."""
from __future__ import annotations

from onestep.argtypes import conti_from, positive_int
from onestep.cli.flags import add_sampling

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_import_dd1(args) -> None:
    from onestep.importers import import_dd1
    from onestep.samplers import sampling_config_from_args

    final = import_dd1(args.dd1, args.teacher, args.run_dir, sampling_config_from_args(args), args.conti_from)
    print(f"DD1 generator: {final}\n(e.g. onestep sample --run {final.parent} --method dd1 --sampling-steps 1)")


def cmd_import_llamagen(args) -> None:
    from onestep.importers import import_llamagen

    tok, teacher = import_llamagen(args.gpt, args.vq, args.out, args.gpt_preset, args.image_size, args.vq_preset,
                                   args.num_classes)
    print(f"tokenizer: {tok}\nteacher: {teacher}\n(e.g. onestep sample --run {teacher.parent} --cfg-scale 2.0 "
          f"--top-k 0)")


def cmd_import_var(args) -> None:
    from onestep.importers import import_var

    tok, teacher = import_var(args.var, args.vae, args.out, args.var_preset, args.vae_preset, args.num_classes)
    print(f"tokenizer: {tok}\nteacher: {teacher}\n(e.g. onestep sample --run {teacher.parent} --cfg-schedule linear "
          f"--cfg-scale 2.5 --top-k 900)")


def register(sub) -> None:
    p = sub.add_parser("import-llamagen", help="import published LlamaGen GPT + VQ-16 weights as tokenizer and "
                                               "teacher runs",
                       description="Convert c2i_*.pt and vq_ds16_c2i.pt (on disk; weights under 'model' or bare) into "
                                   "onestep run directories OUT/tokenizer and OUT/teacher. Strict: a file of another "
                                   "shape fails with every mismatched key listed (a stray 'freqs_cis' is dropped).")
    p.add_argument("--gpt", required=True, help="LlamaGen c2i GPT weights (.pt, .pth or .safetensors)")
    p.add_argument("--vq", required=True, help="LlamaGen VQ-16 tokenizer weights")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer/ and teacher/)")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="256 (16x16 tokens) or 384 (24x24, the XL/XXL files); default 256")
    p.add_argument("--gpt-preset", default=None, help="GPT preset (default: the official size of the file)")
    p.add_argument("--vq-preset", default="vq-16", help="tokenizer preset (default: vq-16, the published one)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="default: the class table's rows - 1")
    p.set_defaults(func=cmd_import_llamagen)
    p = sub.add_parser("import-dd1", help="import a released DD1 generator (LlamaGen-DD or VAR-DD) for a teacher run",
                       description="Convert a released DD1 file (LlamaGen-DD llamagen-B/L.pt, VAR-DD var-dNN.pth) into "
                                   "a DD1 run directory RUN_DIR for the teacher run it distils (e.g. one written by "
                                   "import-llamagen / import-var). Strict but for the buffers the release may omit.")
    p.add_argument("--dd1", required=True, help="the released DD1 generator file")
    p.add_argument("--teacher", required=True, help="the teacher run it distils")
    p.add_argument("--run-dir", required=True, help="the DD1 run directory to write")
    p.add_argument("--conti-from", type=conti_from, default=None, metavar="S",
                   help="the release's output rule recorded in the run: argmax codes before position S, the continuous "
                        "head's tokens from S on (default: 80 for LlamaGen-DD, the release's --split_t; none for "
                        "VAR-DD; -1 = argmax codes everywhere)")
    add_sampling(p, cfg_scale=1.0)
    p.set_defaults(func=cmd_import_dd1)
    p = sub.add_parser("import-var", help="import published VAR + VQVAE weights as tokenizer and teacher runs",
                       description="Convert var_dNN.pth and vae_ch160v4096z32.pth (bare state_dicts, on disk) into "
                                   "onestep run directories OUT/tokenizer and OUT/teacher. Strict: a file of another "
                                   "shape fails with every mismatched key listed.")
    p.add_argument("--var", required=True, help="VAR transformer weights (.pth, .pt or .safetensors)")
    p.add_argument("--vae", required=True, help="VAR VQVAE weights")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer/ and teacher/)")
    p.add_argument("--var-preset", default=None, help="VAR preset (default: VAR-d{depth of the file})")
    p.add_argument("--vae-preset", default="vae-ch160", help="tokenizer preset (default: vae-ch160, the published one)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="default: the class embedding's rows - 1")
    p.set_defaults(func=cmd_import_var)
