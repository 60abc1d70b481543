"""Re-write an exported model's card (e.g. with evaluation results) and upload the folder to the Hub.

    python -m training.export --model-dir runs/pretrain/model --eval-json report/metrics.json
    python -m training.export --model-dir runs/pretrain/model --push-to-hub user/plan-cxr --dry-run
"""

from __future__ import annotations

import argparse

from plan_hf.hub import format_upload_plan, push_to_hub, write_model_card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="the folder training.pretrain exported (<output_dir>/model)")
    parser.add_argument("--eval-json", help="metrics JSON whose numbers become the card's results table")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded")
    args = parser.parse_args(argv)
    card_kwargs = {"repo_id": args.push_to_hub} if args.push_to_hub else {}
    print(f"wrote {write_model_card(args.model_dir, args.eval_json, **card_kwargs)}")
    if args.push_to_hub:
        files = push_to_hub(args.model_dir, args.push_to_hub, private=args.private, dry_run=args.dry_run)
        print(format_upload_plan(files, args.push_to_hub) if args.dry_run
              else f"uploaded {len(files)} files to https://huggingface.co/{args.push_to_hub}")


if __name__ == "__main__":
    main()
