-- Every write of a plan or its subtasks sets the plan's revision to a fresh value of this
-- sequence (never reused, even by a rolled-back transaction): planner keeps a plan's state
-- in memory only while the row still shows the revision it wrote.
CREATE SEQUENCE plan_revision;
ALTER TABLE execution_plans ADD COLUMN revision bigint NOT NULL DEFAULT nextval('plan_revision');
-- no longer needed: whether a plan has open subtasks is known from its state
DROP INDEX subtask_executions_open;
-- nor the dependency edges: planner finds a subtask's dependents in the plan's state
DROP TABLE subtask_dependencies;
