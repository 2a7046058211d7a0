"""The absl apps: the main job (`sequential_finetune`), `compare` and
`task_free`.

Installed as the package `keras_mas_apps`, with a console script each
(`keras-mas-finetune`, `keras-mas-compare`, `keras-mas-task-free`) and
`python -m keras_mas_apps.<app>`; in a clone, also
`python apps/<app>.py`.
"""
