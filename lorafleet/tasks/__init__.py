"""What a task needs besides its declaration: the metric library, the safety rules, and the
shipped task definitions (the work-marketplace tasks and ``chat``) as YAML files.

The declaration itself is :class:`lorafleet.fleet.TaskDefinition`; nothing here knows any
task by name.
"""
