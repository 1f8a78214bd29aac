//! deploy_local end-to-end tests.
