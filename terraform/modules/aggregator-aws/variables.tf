variable "name" {
  description = "Name prefix for every resource, e.g. \"dcs-prod\". Lower case letters, digits and '-'."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}[a-z0-9]$", var.name))
    error_message = "name must be 3-22 characters of [a-z0-9-], starting with a letter."
  }
}

variable "vpc_cidr" {
  description = "CIDR of the VPC. Only private subnets are created in it (one /20 per availability zone)."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zones" {
  description = "Availability zones (names, e.g. [\"eu-central-1a\", \"eu-central-1b\"]) for the subnets, the aggregator tasks and the load balancer. Listed explicitly, so the layout never changes when AWS adds a zone."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 3
    error_message = "List 2 or 3 availability zones: the database is multi-AZ."
  }
}

variable "agent_cidrs" {
  description = "Networks the edge agents connect from (site VPNs, Direct Connect, a transit gateway). Only they reach the agent port 8443 of the load balancer."
  type        = list(string)

  validation {
    condition     = length(var.agent_cidrs) > 0 && !contains(var.agent_cidrs, "0.0.0.0/0")
    error_message = "List the agents' networks explicitly; 0.0.0.0/0 is refused."
  }
}

variable "monitoring_cidrs" {
  description = "Networks the Prometheus servers scrape the aggregators' admin port (9464, plain HTTP: /metrics, /health, /ready) from. Empty: only the load balancer's health checks reach it."
  type        = list(string)
  default     = []
}

variable "privatelink_allowed_principals" {
  description = "AWS principals (account or role ARNs) allowed to connect to the agent endpoint through PrivateLink (a VPC endpoint service on the load balancer). Empty: no endpoint service."
  type        = list(string)
  default     = []
}

variable "aggregator_image" {
  description = "The dcs-aggregator container image, pinned by digest (REGISTRY/dcs-aggregator@sha256:...). It must be reachable through the ECR VPC endpoints, i.e. mirrored into ECR."
  type        = string

  validation {
    condition     = can(regex("@sha256:[0-9a-f]{64}$", var.aggregator_image))
    error_message = "Pin aggregator_image by digest (...@sha256:<64 hex>), so every task runs the same build."
  }
}

variable "aggregator_desired_count" {
  description = "Aggregator tasks running normally. At least 2, so one can fail or be replaced without an outage."
  type        = number
  default     = 2

  validation {
    condition     = var.aggregator_desired_count >= 2
    error_message = "Run at least two aggregator tasks."
  }
}

variable "aggregator_max_count" {
  description = "Most aggregator tasks the CPU target-tracking policy may scale out to."
  type        = number
  default     = 6
}

variable "aggregator_cpu" {
  description = "Fargate CPU units per aggregator task (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "aggregator_memory" {
  description = "Fargate memory per aggregator task, in MiB. A batch may take up to limits.max_decompressed_bytes (128 MiB) while it is parsed."
  type        = number
  default     = 2048
}

variable "aggregator_db_max_connections" {
  description = "database.max_connections of each aggregator task. Keep tasks x this below the database's max_connections."
  type        = number
  default     = 16
}

variable "db_instance_class" {
  description = "RDS instance class of the PostgreSQL database."
  type        = string
  default     = "db.m6g.large"
}

variable "db_allocated_storage" {
  description = "Initial database storage in GiB (gp3)."
  type        = number
  default     = 100
}

variable "db_max_allocated_storage" {
  description = "Storage autoscaling ceiling in GiB."
  type        = number
  default     = 1000
}

variable "db_backup_retention_days" {
  description = "Days of automated backups, which are also the window of point-in-time recovery (1-35)."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 7 && var.db_backup_retention_days <= 35
    error_message = "Keep 7 to 35 days of backups."
  }
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log groups (aggregator, VPC flow logs, RDS)."
  type        = number
  default     = 365
}

variable "deletion_protection" {
  description = "Protect the load balancer and the database from deletion. Turn off only to tear down a test environment."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
