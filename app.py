"""The phrase-grounding app: `python -m app --model DIR_OR_HUB_ID` locally, or `app.py` of a Hugging Face Space (the
model then comes from the Space variable PLAN_APP_MODEL). The logic lives in `plan_hf.app`."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing phones home

from plan_hf.app import main  # noqa: E402

if __name__ == "__main__":
    main()
