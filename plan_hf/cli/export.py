"""Re-write an exported model's card (e.g. with evaluation results) and upload the folder to the Hub.

    plan-export --model_name_or_path runs/pretrain/model --eval_json report/metrics.json
    plan-export --model_name_or_path runs/pretrain/model --push_to_hub user/plan-cxr --dry_run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..hub import format_upload_plan, push_to_hub, write_model_card
from .arguments import ConfigError, HubArguments, ModelArguments, RuntimeArguments, console_script, parse

RENAMED = {"model_dir": "model_name_or_path", "private": "hub_private"}


@dataclass(kw_only=True)
class ExportArguments(ModelArguments, HubArguments, RuntimeArguments):
    model_name_or_path: str  # the folder plan-pretrain exported (<output_dir>/model)

    def __post_init__(self) -> None:
        if not Path(self.model_name_or_path).is_dir():
            raise ConfigError(f"model_name_or_path: {self.model_name_or_path} is not a folder (plan-export re-writes "
                              "the card of an exported folder)")


def main(argv: list[str] | None = None) -> None:
    args = parse(ExportArguments, argv, prog="plan-export", description=__doc__.split("\n\n")[0], renamed=RENAMED)
    card_kwargs = {"repo_id": args.push_to_hub} if args.push_to_hub else {}
    print(f"wrote {write_model_card(args.model_name_or_path, args.eval_json, **card_kwargs)}")
    if args.push_to_hub:
        files = push_to_hub(args.model_name_or_path, args.push_to_hub, private=args.hub_private,
                            dry_run=args.dry_run)
        print(format_upload_plan(files, args.push_to_hub) if args.dry_run
              else f"uploaded {len(files)} files to https://huggingface.co/{args.push_to_hub}")


cli = console_script(main)

if __name__ == "__main__":
    main()
