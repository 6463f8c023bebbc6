-- A job's commands are keyed by the name of the step that sent them, not its position: a job
-- resumed by a newer broker whose job declares one more step must still find the commands its
-- steps sent. Commands stored before this migration take the name of the step at their index.
ALTER TABLE commands ADD COLUMN job_step_name TEXT NOT NULL DEFAULT '';
UPDATE commands SET job_step_name = COALESCE(
    (SELECT name FROM job_steps WHERE job_steps.job_id = commands.job_id
        AND job_steps.idx = commands.job_step), '')
WHERE job_id IS NOT NULL;
