//! `[pool]`: cluster seat pools on etcd. The table is `hostbind_pool::PoolConfig` exactly (the
//! pool crate validates it: https endpoints only, pool ids, timeouts); its keys are documented
//! in `config::KEYS`.

pub use hostbind_pool::PoolConfig;
