# The test environment: the central DCS stack in AWS.
#
#   cp backend.hcl.example backend.hcl && cp terraform.tfvars.example terraform.tfvars
#   terraform init -backend-config=backend.hcl
#   terraform plan -out plan && terraform apply plan
#
# Then fill the two secrets and run the migration (docs/DEPLOYMENT.md, "AWS").

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      Project     = "dcs"
      Environment = "test"
      ManagedBy   = "terraform"
    }
  }
}

module "central" {
  source = "../../modules/aggregator-aws"

  name               = "dcs-test"
  availability_zones = var.availability_zones
  vpc_cidr           = "10.42.0.0/16"
  agent_cidrs        = var.agent_cidrs
  monitoring_cidrs   = var.monitoring_cidrs

  aggregator_image         = var.aggregator_image
  aggregator_desired_count = 2
  aggregator_max_count     = 4
  aggregator_cpu           = 1024
  aggregator_memory        = 2048

  db_instance_class        = "db.m6g.large"
  db_allocated_storage     = 100
  db_backup_retention_days = 14
}

output "agent_endpoint" {
  description = "Point the agents' DNS name (on the aggregator certificate) at this."
  value       = module.central.agent_endpoint
}

output "database_url_secret_arn" {
  description = "Put the aggregator's database URL here."
  value       = module.central.database_url_secret_arn
}

output "tls_secret_arn" {
  description = "Put the aggregator's TLS material here (JSON: ca, cert, key)."
  value       = module.central.tls_secret_arn
}

output "database_endpoint" {
  description = "PostgreSQL host:port."
  value       = module.central.database_endpoint
}

output "database_owner_url_secret_arn" {
  description = "Put the schema owner's database URL here (migrations only)."
  value       = module.central.database_owner_url_secret_arn
}

output "migrate_task_definition_arn" {
  description = "Run this task once before every deployment: it applies the migrations."
  value       = module.central.migrate_task_definition_arn
}
