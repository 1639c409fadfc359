//! The one read-only rule of every SQL endpoint (HTTP `/query`, `sluice sql`, the
//! PostgreSQL wire protocol): a statement allow-list checked on the parsed statement,
//! before anything is planned. What is not on the list is refused, so a statement kind
//! DataFusion learns later is refused until someone decides otherwise.

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Set, SetExpr, Statement};

/// The start of every refusal's message.
pub const READ_ONLY: &str = "sluice's SQL endpoints are read-only";

/// Whether the endpoint keeps a session per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    /// Each client has its own session (PostgreSQL): `SET` of a client setting,
    /// transactions and cursors are the client's own.
    PerClient,
    /// One context for everyone (HTTP, `sluice sql`): `SET` would change every client's
    /// settings, so it is refused, and so are transactions and cursors.
    Shared,
}

/// What may run, for the refusal's message.
fn allowed(sessions: Sessions) -> &'static str {
    match sessions {
        Sessions::PerClient => "queries, EXPLAIN, SHOW and session SET only",
        Sessions::Shared => "queries, EXPLAIN and SHOW only",
    }
}

/// Why `statement` is refused on an endpoint with `sessions`, or `None` if it may run.
pub fn refusal(statement: &Statement, sessions: Sessions) -> Option<String> {
    let per_client = sessions == Sessions::PerClient;
    let allowed_here = match statement {
        // SELECT … INTO creates a table.
        Statement::Query(query) => !matches!(&*query.body, SetExpr::Select(s) if s.into.is_some()),
        // EXPLAIN ANALYZE runs its statement.
        Statement::Explain { statement, .. } => return refusal(statement, sessions),
        Statement::ExplainTable { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowSchemas { .. } => true,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Deallocate { .. }
        | Statement::Discard { .. } => per_client,
        // DataFusion's own settings are shared by every client of this server.
        Statement::Set(Set::SingleAssignment { variable, .. }) => {
            per_client
                && !variable
                    .to_string()
                    .to_ascii_lowercase()
                    .starts_with("datafusion.")
        }
        Statement::Set(_) => per_client,
        _ => false,
    };
    if allowed_here {
        return None;
    }
    let what = match statement {
        Statement::Set(_) if per_client => {
            "SET of DataFusion's settings (shared by every client)".to_owned()
        }
        _ => first_words(&statement.to_string()),
    };
    Some(format!(
        "{READ_ONLY}: {what} is not allowed ({})",
        allowed(sessions)
    ))
}

/// The same rule for DataFusion's statements (its extensions: `CREATE EXTERNAL TABLE`,
/// `COPY … TO`, `RESET` are refused; `EXPLAIN` is judged by what it explains).
pub fn refusal_df(statement: &DfStatement, sessions: Sessions) -> Option<String> {
    match statement {
        DfStatement::Statement(statement) => refusal(statement, sessions),
        DfStatement::Explain(explain) => refusal_df(&explain.statement, sessions),
        other => Some(format!(
            "{READ_ONLY}: {} is not allowed ({})",
            first_words(&other.to_string()),
            allowed(sessions)
        )),
    }
}

fn first_words(text: &str) -> String {
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    fn parse(sql: &str) -> DfStatement {
        let state = SessionContext::new().state();
        let dialect = state.config().options().sql_parser.dialect;
        state.sql_to_statement(sql, &dialect).unwrap()
    }

    #[test]
    fn only_what_cannot_write_runs() {
        for sql in [
            "SELECT 1",
            "WITH t AS (SELECT 1 AS x) SELECT x FROM t",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            assert_eq!(refusal_df(&parse(sql), Sessions::Shared), None, "{sql}");
            assert_eq!(refusal_df(&parse(sql), Sessions::PerClient), None, "{sql}");
        }
        for sql in [
            "CREATE TABLE t (x INT)",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'",
            "INSERT INTO telemetry VALUES (1)",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "DROP TABLE telemetry",
            "SELECT 1 INTO t",
            "EXPLAIN ANALYZE INSERT INTO telemetry VALUES (1)",
            "EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'",
            "SET datafusion.execution.batch_size = 1",
            "CREATE VIEW v AS SELECT 1",
        ] {
            for sessions in [Sessions::Shared, Sessions::PerClient] {
                let why = refusal_df(&parse(sql), sessions).unwrap_or_else(|| panic!("{sql}"));
                assert!(why.starts_with(READ_ONLY), "{why}");
            }
        }
        // A client's own setting: fine where the client has a session, not where
        // everybody shares one.
        let set = parse("SET application_name = 'grafana'");
        assert_eq!(refusal_df(&set, Sessions::PerClient), None);
        assert_eq!(
            refusal_df(&set, Sessions::Shared).unwrap(),
            "sluice's SQL endpoints are read-only: SET application_name = is not allowed (queries, EXPLAIN and SHOW only)"
        );
    }
}
