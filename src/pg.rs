//! The PostgreSQL wire protocol (psql, Grafana's PostgreSQL data source, JDBC, psycopg)
//! over the same DataFusion catalog as `/query`, through `datafusion-postgres`: simple and
//! extended query protocol, parameters, `pg_catalog` and `information_schema`. Read-only:
//! every statement other than a query, `EXPLAIN`, `SHOW`, a session `SET` and transaction
//! or cursor control is refused, as on the HTTP endpoint.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::noop::NoopStartupHandler;
use datafusion_postgres::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::{ClientInfo, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::{DfSessionService, QueryHook};
use futures::Sink;
use sluice_storage::Storage;

mod compat;

/// The catalog name sluice's tables live in (`sluice.public.telemetry`).
const CATALOG: &str = "sluice";

pub(crate) struct PgServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PgServer {
    /// Binds `addr` (port 0 allowed) and serves on `runtime`. With `password`, clients
    /// must send it (cleartext password authentication, any user name).
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        addr: SocketAddr,
        storage: &Storage,
        password: Option<String>,
    ) -> anyhow::Result<PgServer> {
        let ctx = Arc::new(storage.session().clone());
        setup_pg_catalog(&ctx, CATALOG, EmptyContextProvider)
            .map_err(|e| anyhow::anyhow!("registering pg_catalog: {e}"))?;
        compat::register(&ctx);
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(ReadOnly),
            Arc::new(compat::InformationSchemaTypes),
            Arc::new(CursorStatementHook),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        let handlers = Arc::new(Handlers {
            service: Arc::new(DfSessionService::new_with_hooks(ctx, hooks)),
            startup: Arc::new(match password {
                Some(password) => {
                    Startup::Password(Box::new(CleartextPasswordAuthStartupHandler::new(
                        Secret(password),
                        DefaultServerParameterProvider::default(),
                    )))
                }
                None => Startup::Open(Open),
            }),
        });
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the PostgreSQL listener {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let task = runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((socket, peer)) => {
                        let handlers = handlers.clone();
                        tokio::spawn(async move {
                            let served = datafusion_postgres::pgwire::tokio::process_socket(
                                socket, None, handlers,
                            )
                            .await;
                            if let Err(e) = served {
                                tracing::debug!(%peer, error = %e, "PostgreSQL connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "PostgreSQL listener: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(%addr, "PostgreSQL ready");
        Ok(PgServer { addr, task })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections (open ones end with the process).
    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

struct Handlers {
    service: Arc<DfSessionService>,
    startup: Arc<Startup>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// No authentication.
struct Open;

impl NoopStartupHandler for Open {}

/// The configured password, whatever the user name.
#[derive(Debug)]
struct Secret(String);

#[async_trait]
impl AuthSource for Secret {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(None, self.0.as_bytes().to_vec()))
    }
}

enum Startup {
    Open(Open),
    Password(Box<CleartextPasswordAuthStartupHandler<Secret, DefaultServerParameterProvider>>),
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(open) => open.on_startup(client, message).await,
            Startup::Password(password) => password.on_startup(client, message).await,
        }
    }
}

/// The refusal of `statement` as a PostgreSQL error (SQLSTATE 25006,
/// read_only_sql_transaction), or `None` if it may run.
fn refuse<T>(statement: &Statement) -> Option<PgWireResult<T>> {
    sluice_storage::refusal(statement, sluice_storage::Sessions::PerClient).map(|message| {
        Err(PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".into(),
            "25006".into(),
            message,
        ))))
    })
}

/// Refuses every statement that could write, or read files outside sluice's tables.
struct ReadOnly;

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refuse(statement)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        refuse(statement)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refuse(statement)
    }
}
