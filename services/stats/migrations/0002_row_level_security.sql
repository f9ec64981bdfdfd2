-- Each user's records are theirs alone, at the database level. A request made for a user
-- runs as stats_user with the caller's claims in request.jwt.claims (both local to its
-- transaction: Runtime.as_user); the consumers, logged in as stats_app, write every user's
-- rows. FORCE: the owner is held to the policies too. The function is evaluated once per
-- statement, not once per row, through the scalar subquery in the policy.
CREATE FUNCTION current_user_id() RETURNS text
    LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub' $$;

ALTER TABLE model_statistics ENABLE ROW LEVEL SECURITY;
ALTER TABLE model_statistics FORCE ROW LEVEL SECURITY;

CREATE POLICY consumers_write_every_users_rows ON model_statistics
    TO stats_app USING (true) WITH CHECK (true);
CREATE POLICY a_user_reads_their_own_rows ON model_statistics
    FOR SELECT TO stats_user USING (user_id = (SELECT current_user_id()));

GRANT SELECT ON model_statistics TO stats_user;
